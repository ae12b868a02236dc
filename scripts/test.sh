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
