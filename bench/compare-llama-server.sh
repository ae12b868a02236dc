#!/usr/bin/env bash
# kvroute-agent vs llama.cpp's llama-server: same model (the default GGUF), same cores (taskset),
# same load (bench/load.py: N concurrent streaming clients, fixed prompt/output lengths).
# Prints both results and the kvroute / llama-server ratios.
#
# llama-server is built from the llama.cpp sources vendored in the PyPI source distribution of
# llama-cpp-python (pip download --no-binary), into $KVROUTE_CACHE/llama.cpp-build; nothing of it
# is committed. Needs cmake and a C++ compiler (apt-get install -y cmake g++).
#
# usage: bench/compare-llama-server.sh [--cores 2] [--concurrency 8] [--requests 32]
#                                      [--prompt-words 128] [--max-tokens 64]
#        bench/compare-llama-server.sh --build-only   (just build llama-server)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export KVROUTE_CACHE="${KVROUTE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvroute}"
CORES=2 CONC=8 REQS=32 PWORDS=128 MAXTOK=64 BUILD_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build-only) BUILD_ONLY=1; shift ;;
    --cores) CORES="$2"; shift 2 ;;
    --concurrency) CONC="$2"; shift 2 ;;
    --requests) REQS="$2"; shift 2 ;;
    --prompt-words) PWORDS="$2"; shift 2 ;;
    --max-tokens) MAXTOK="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

mkdir -p "$KVROUTE_CACHE"
# shellcheck source=/dev/null
source scripts/test.d/10-model.sh
# shellcheck source=/dev/null
source scripts/test.d/20-python.sh
MODEL="$KVROUTE_MODEL_PATH"

BUILD="$KVROUTE_CACHE/llama.cpp-build"
SERVER="$BUILD/bin/llama-server"
if [ ! -x "$SERVER" ]; then
  command -v cmake >/dev/null || { echo "cmake missing: apt-get install -y cmake" >&2; exit 1; }
  SRC="$KVROUTE_CACHE/llama-cpp-python-src"
  rm -rf "$SRC" && mkdir -p "$SRC"
  python3 -m pip download --quiet --no-binary llama-cpp-python --no-deps \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$SRC"
  tar -xzf "$SRC"/llama_cpp_python-*.tar.gz -C "$SRC"
  LLAMA_DIR="$(echo "$SRC"/llama_cpp_python-*/vendor/llama.cpp)"
  cmake -S "$LLAMA_DIR" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  cmake --build "$BUILD" --target llama-server -j "$(nproc)"
fi
if [ "$BUILD_ONLY" = 1 ]; then echo "built $SERVER"; exit 0; fi

# KVROUTE_AGENT_BIN picks another kvroute-agent build (the dev profile already optimizes the
# engine at opt-level 3); by default the release one is built.
if [ -n "${KVROUTE_AGENT_BIN:-}" ]; then
  AGENT="$KVROUTE_AGENT_BIN"
else
  cargo build --release -p kvroute-agent
  AGENT="${CARGO_TARGET_DIR:-$ROOT/target}/release/kvroute-agent"
fi

LAST_CORE=$((CORES - 1))
CTX=$(( CONC * (PWORDS * 2 + MAXTOK + 64) ))
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_http() { # URL
  for _ in $(seq 1 600); do
    if curl -sf "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "server at $1 did not come up" >&2; return 1
}

run_load() { # BASE_URL MODEL
  "$KVROUTE_PYTHON" bench/load.py "$1" "$2" --concurrency "$CONC" --requests "$REQS" \
    --prompt-words "$PWORDS" --max-tokens "$MAXTOK"
}

echo "== llama-server ($SERVER), cores 0-$LAST_CORE, ctx $CTX, parallel $CONC"
taskset -c "0-$LAST_CORE" "$SERVER" -m "$MODEL" --host 127.0.0.1 --port 18080 -c "$CTX" \
  --parallel "$CONC" --threads "$CORES" --log-disable >/dev/null 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:18080/health"
LLAMA=$(run_load "http://127.0.0.1:18080/v1" "default")
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
echo "$LLAMA"

echo "== kvroute-agent ($AGENT), cores 0-$LAST_CORE"
taskset -c "0-$LAST_CORE" "$AGENT" serve --model "$MODEL" --http 127.0.0.1:18081 \
  --grpc 127.0.0.1:0 --device cpu --kv-memory 1GiB --served-model-name bench >/dev/null 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:18081/ready"
KV=$(run_load "http://127.0.0.1:18081/v1" "bench")
echo "$KV"

python3 - "$KV" "$LLAMA" "$CORES" "$CONC" "$PWORDS" "$MAXTOK" <<'PY'
import json, sys
kv, ll = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"\ncores={sys.argv[3]} concurrency={sys.argv[4]} prompt_words={sys.argv[5]} max_tokens={sys.argv[6]}")
print("| metric | kvroute | llama-server | kvroute / llama-server |")
print("| --- | --- | --- | --- |")
for k, name in [("req_per_s", "completed requests/s"), ("output_tok_per_s", "output tokens/s"),
                ("ttft_p50_s", "TTFT p50 (s)"), ("ttft_p99_s", "TTFT p99 (s)")]:
    print(f"| {name} | {kv[k]:.3f} | {ll[k]:.3f} | {kv[k] / ll[k]:.2f} |")
PY
