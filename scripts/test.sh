#!/usr/bin/env bash
# kvroute's test command (the README's): installs what the tests need, builds, runs every test.
#
# Set-up steps live in scripts/test.d/*.sh (sourced in order): each installs one thing the tests
# need (the default model, a Python venv with the `openai` client, helm, NVRTC, ...) into the
# cache directory and exports where it is. They must be idempotent and quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export KVROUTE_CACHE="${KVROUTE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvroute}"
export PROPTEST_CASES="${PROPTEST_CASES:-1000}"
mkdir -p "$KVROUTE_CACHE"
for step in scripts/test.d/*.sh; do
  [ -e "$step" ] || continue
  echo "== setup: $step"
  # shellcheck source=/dev/null
  source "$step"
done
cd "$ROOT"
echo "== build"
cargo build --workspace --bins
echo "== test"
cargo test --workspace "$@"
# The CUDA backend (cargo feature `cuda`) with no GPU: it must build and lint clean, and what can
# run without a driver does (the engine refuses --device cuda clearly; the agent exits non-zero
# at start with a message naming the flag, never a panic). The GPU itself is checked by
# engine/gpu-check.sh on a machine that has one.
echo "== cuda feature (no GPU needed)"
cargo clippy --workspace --all-targets --features kvroute-agent/cuda -- -D warnings
cargo test -p kvroute-engine --features cuda --test runtime_device
cargo test -p kvroute-agent --features cuda --lib --test device_cuda
