# NVRTC (CUDA 13.0, NVIDIA's run-time CUDA C compiler) for the kernel-compile tests: unpacked from
# the PyPI wheel `nvidia-cuda-nvrtc` into the cache, exported as KVROUTE_NVRTC_LIB_DIR. No CUDA
# install or GPU needed. Sourced by scripts/test.sh; idempotent, quick when already done.
NVRTC_VERSION="13.0.88"
NVRTC_DIR="$KVROUTE_CACHE/nvrtc-$NVRTC_VERSION"
if [ ! -e "$NVRTC_DIR/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  echo "installing NVRTC $NVRTC_VERSION into $NVRTC_DIR"
  _nvrtc_tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --python-version 3.11 --implementation py --abi none \
    -d "$_nvrtc_tmp" "nvidia-cuda-nvrtc==$NVRTC_VERSION"
  rm -rf "$NVRTC_DIR.partial"
  mkdir -p "$NVRTC_DIR.partial"
  # Only the libraries: the `.alt` variants are another build of the same thing.
  python3 - "$_nvrtc_tmp" "$NVRTC_DIR.partial" <<'PY'
import glob, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(glob.glob(src + "/nvidia_cuda_nvrtc-*.whl")[0]) as z:
    names = [n for n in z.namelist() if n == "nvidia/cu13/lib/libnvrtc.so.13"
             or n.startswith("nvidia/cu13/lib/libnvrtc-builtins.so.")]
    assert len(names) == 2, names
    z.extractall(dst, names)
PY
  rm -rf "$_nvrtc_tmp" "$NVRTC_DIR"
  mv "$NVRTC_DIR.partial" "$NVRTC_DIR"
fi
export KVROUTE_NVRTC_LIB_DIR="$NVRTC_DIR/nvidia/cu13/lib"
