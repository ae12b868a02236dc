#!/usr/bin/env bash
# kvroute's GPU check, for a machine with an NVIDIA GPU (see docs/cuda.md).
#
#   engine/gpu-check.sh --build       on a machine with Rust: build target/release/examples/gpu_check
#                                     and target/release/kvroute-agent (feature cuda, stripped)
#   engine/gpu-check.sh               on the GPU machine: run the check (no Rust or network needed)
#   engine/gpu-check.sh --dry-run     everything up to opening the GPU, then stop (exit 0)
#   engine/gpu-check.sh --agent-only  only the end-to-end agent run (step 4 below)
#
# Writes into $OUT (default target/gpu-check-out): gpu_check.json (numerics of every kernel and of the
# forward pass against the CPU references, the default model's first-step logits against the CPU
# and llama.cpp when its GGUF is at hand, paged-attention decode bandwidth against a
# device-to-device copy, decode tokens/s at batch 1/16/64),
# sdpa.json (PyTorch scaled_dot_product_attention on the same shape, K/V contiguous),
# agent_e2e.json (decode tokens/s through `kvroute-agent serve --device cuda` on the default model
# at batch 1/16/64, with the agent's KV sizing log line and its block metrics; needs the model),
# summary.json (the headline figures), log.txt. Ends within about 10 minutes by construction:
# each step runs under a time limit (4.5 + 1.5 + 1.5 + 2 minutes at most: 9.5; expected a few
# minutes in all).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${GPU_CHECK_BIN:-target/release/examples/gpu_check}"
AGENT_BIN="${GPU_CHECK_AGENT_BIN:-target/release/kvroute-agent}"
# cuda; `cpu` only to smoke-test this script's agent step on a machine without a GPU.
AGENT_DEVICE="${GPU_CHECK_AGENT_DEVICE:-cuda}"
OUT="${OUT:-$PWD/target/gpu-check-out}"
DRY=0
BUILD=0
AGENT_ONLY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --build) BUILD=1 ;;
    --agent-only) AGENT_ONLY=1 ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument '$a' (try --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

if [ "$BUILD" = 1 ]; then
  # Stripped of debug info so both binaries fit in what one device call carries.
  CARGO_PROFILE_RELEASE_STRIP=debuginfo cargo build --release -p kvroute-engine -p kvroute-agent \
    --features kvroute-engine/cuda,kvroute-agent/cuda --example gpu_check --bin kvroute-agent || exit 2
  ls -l "$BIN" "$AGENT_BIN"
  # Building is all `--build` does, unless a run is asked for too (`--build --dry-run`).
  [ "$DRY" = 0 ] && [ "$AGENT_ONLY" = 0 ] && exit 0
fi
if [ ! -x "$BIN" ] && [ "$AGENT_ONLY" = 0 ]; then
  echo "gpu-check: $BIN is missing: build it where Rust is (engine/gpu-check.sh --build) and carry it" >&2
  exit 2
fi

# CUDA 13 libraries the binary loads at run time: NVRTC and cuBLAS, from the CUDA install or the
# pip wheels beside PyTorch. The driver (libcuda) comes from the system.
lib_dirs() {
  local d
  for d in ${KVROUTE_NVRTC_LIB_DIR:-} ${CUDA_HOME:+$CUDA_HOME/lib64} /usr/local/cuda/lib64 \
    /usr/local/cuda/targets/x86_64-linux/lib; do
    echo "$d"
  done
  command -v python3 > /dev/null && python3 - << 'PY' 2> /dev/null
import glob, site, sys
roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
for r in roots:
    for d in sorted(glob.glob(r + "/nvidia/*/lib")):
        print(d)
PY
}
find_dir() {
  local d
  for d in $(lib_dirs); do
    for f in "$d"/$1; do
      [ -e "$f" ] && { echo "$d"; return 0; }
    done
  done
  return 1
}
if nvrtc_dir="$(find_dir 'libnvrtc.so.1[23]*')"; then
  export KVROUTE_NVRTC_LIB_DIR="$nvrtc_dir"
  echo "gpu-check: NVRTC from $nvrtc_dir"
else
  echo "gpu-check: NVRTC (libnvrtc.so.13) not found: set KVROUTE_NVRTC_LIB_DIR" >&2
  exit 2
fi
if blas_dir="$(find_dir 'libcublas.so.1[23]*')"; then
  lt_dir="$(find_dir 'libcublasLt.so.1[23]*' || echo "$blas_dir")"
  export LD_LIBRARY_PATH="$blas_dir:$lt_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "gpu-check: cuBLAS from $blas_dir"
elif [ "$DRY" = 0 ]; then
  echo "gpu-check: cuBLAS (libcublas.so.13) not found; the check will say so if it needs it" >&2
fi

# The default model, for its logits check and tokens/s: $KVROUTE_MODEL_PATH, else
# target/gpu-check-model/ (git-ignored) holding the GGUF whole or split in parts (`split -b 40M`), since
# the 98 MB file is larger than what one device call carries. Without it the check runs a
# synthetic model of the same shape.
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_DIR="${GPU_CHECK_MODEL_DIR:-target/gpu-check-model}"
if [ -z "${KVROUTE_MODEL_PATH:-}" ]; then
  if [ -f "$MODEL_DIR/$MODEL_FILE" ]; then
    export KVROUTE_MODEL_PATH="$PWD/$MODEL_DIR/$MODEL_FILE"
  elif compgen -G "$MODEL_DIR/$MODEL_FILE.part-*" > /dev/null; then
    cat "$MODEL_DIR/$MODEL_FILE".part-* > "/tmp/$MODEL_FILE"
    export KVROUTE_MODEL_PATH="/tmp/$MODEL_FILE"
  fi
fi
if [ -n "${KVROUTE_MODEL_PATH:-}" ]; then
  if [ "$(sha256sum "$KVROUTE_MODEL_PATH" | cut -d' ' -f1)" = "$MODEL_SHA" ]; then
    echo "gpu-check: default model at $KVROUTE_MODEL_PATH (sha256 verified)"
  else
    echo "gpu-check: $KVROUTE_MODEL_PATH is not the default model (sha256 differs); using it anyway" >&2
  fi
else
  echo "gpu-check: no default model (set KVROUTE_MODEL_PATH or fill $MODEL_DIR/); synthetic weights instead"
fi

# End to end through the engine: `kvroute-agent serve --device cuda` on the default model, then
# decode tokens/s at batch 1/16/64 over its OpenAI API (engine/gpu-check-agent.py, standard
# library only). Writes agent_e2e.json (with the agent's KV-sizing log line), agent.log.
AGENT_PY="engine/gpu-check-agent.py"
agent_e2e() {
  if [ -z "${KVROUTE_MODEL_PATH:-}" ]; then
    echo "gpu-check: agent e2e not run: no default model"
    echo '{"skipped": "no default model (KVROUTE_MODEL_PATH)"}' > "$OUT/agent_e2e.json"
    return 0
  fi
  if [ ! -x "$AGENT_BIN" ]; then
    echo "gpu-check: agent e2e not run: $AGENT_BIN is missing (engine/gpu-check.sh --build)" >&2
    echo "{\"skipped\": \"no agent binary at $AGENT_BIN\"}" > "$OUT/agent_e2e.json"
    return 1
  fi
  local kv_flag=()
  [ "$AGENT_DEVICE" = cpu ] && kv_flag=(--kv-memory 256MiB)
  "$AGENT_BIN" serve --device "$AGENT_DEVICE" "${kv_flag[@]}" --model "$KVROUTE_MODEL_PATH" \
    --http 127.0.0.1:0 --grpc 127.0.0.1:0 --max-num-seqs 64 --served-model-name gpu-check --log-format json --drain-timeout 2s \
    > "$OUT/agent.stdout" 2> "$OUT/agent.log" &
  local pid=$! url="" i
  for i in $(seq 1 180); do
    grep -q "kvroute-agent ready" "$OUT/agent.stdout" 2> /dev/null && break
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.5
  done
  url="$(sed -n 's/^kvroute-agent listening http=\([^ ]*\) .*/http:\/\/\1/p' "$OUT/agent.stdout" | head -1)"
  local status=0
  if grep -q "kvroute-agent ready" "$OUT/agent.stdout" 2> /dev/null && [ -n "$url" ]; then
    echo "gpu-check: agent ready at $url ($AGENT_DEVICE)"
    timeout 120 python3 -B "$AGENT_PY" --url "$url" --out "$OUT/agent_e2e.json" \
      ${GPU_CHECK_AGENT_ARGS:-} || status=$?
  else
    echo "gpu-check: the agent did not become ready; last log lines:" >&2
    tail -20 "$OUT/agent.log" >&2
    status=2
  fi
  kill -TERM "$pid" 2> /dev/null
  wait "$pid" 2> /dev/null
  # The agent's own account of the KV sizing, beside the figures.
  python3 - "$OUT" "$status" << 'PY' || true
import json, os, sys
out, status = sys.argv[1], int(sys.argv[2])
path = os.path.join(out, "agent_e2e.json")
try:
    with open(path) as f:
        r = json.load(f)
except Exception as e:
    r = {"error": f"no result: {e}"}
with open(os.path.join(out, "agent.log"), errors="replace") as f:
    lines = f.read().splitlines()
def parsed(l):
    try:
        return json.loads(l)
    except ValueError:
        return l
r["kv_sizing_log"] = [parsed(l) for l in lines if "KV cache sized" in l or "engine started" in l]
r["client_status"] = status
with open(path, "w") as f:
    json.dump(r, f, indent=2)
PY
  return "$status"
}

if [ "$AGENT_ONLY" = 1 ]; then
  agent_e2e
  exit $?
fi

SDPA="engine/gpu-check-sdpa.py"
if [ "$DRY" = 1 ]; then
  timeout 120 "$BIN" --dry-run --out "$OUT" || exit 2
  if command -v python3 > /dev/null; then
    python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read())' "$SDPA" && python3 -B "$SDPA" --dry-run --out "$OUT" || exit 2
    python3 -B "$AGENT_PY" --dry-run || exit 2
  fi
  if [ -x "$AGENT_BIN" ]; then
    "$AGENT_BIN" --version || exit 2
  else
    echo "gpu-check: $AGENT_BIN is missing: the agent e2e step will not run (engine/gpu-check.sh --build)" >&2
  fi
  echo "gpu-check: dry run done; stopped before the GPU"
  exit 0
fi

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
status=0
timeout 270 "$BIN" --out "$OUT" || status=$?
if [ "$status" = 2 ] || [ "$status" = 124 ]; then
  echo "gpu-check: the GPU check could not run (exit $status); see above" >&2
  exit 2
fi
timeout 90 python3 -B "$SDPA" --out "$OUT" || echo "gpu-check: the PyTorch comparison failed" >&2
agent_e2e || echo "gpu-check: the agent e2e run failed (see agent.log)" >&2
python3 - "$OUT" << 'PY' || true
import json, os, sys
out = sys.argv[1]
def load(n):
    try:
        with open(os.path.join(out, n)) as f:
            return json.load(f)
    except Exception as e:
        return {"error": f"{n}: {e}"}
g, s, a = load("gpu_check.json"), load("sdpa.json"), load("agent_e2e.json")
bw = g.get("decode_bandwidth", {})
summary = {
    "device": g.get("device"),
    "numerics_failed": g.get("numerics_failed"),
    "decode_ms": bw.get("decode_ms_median"),
    "decode_TBps": (bw.get("decode_bytes_per_s") or 0) / 1e12,
    "copy_TBps_read_plus_write": (bw.get("copy_bytes_per_s_read_plus_write") or 0) / 1e12,
    "fraction_of_copy": bw.get("fraction_of_copy"),
    "target_fraction": 0.85,
    "sdpa_best_ms": s.get("best_ms"),
    "sdpa_backend": s.get("best_backend"),
    "speedup_vs_sdpa": (s["best_ms"] / bw["decode_ms_median"]) if s.get("best_ms") and bw.get("decode_ms_median") else None,
    "e2e_decode": g.get("e2e_decode"),
    "agent_e2e_decode_tok_s": {str(r.get("batch")): r.get("decode_tok_s") for r in a.get("runs", [])},
    "agent_e2e_kv_blocks_total": (a.get("metrics") or {}).get("kvroute_kv_blocks_total"),
}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps(summary, indent=2))
PY
exit "$status"
