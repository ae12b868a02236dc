#!/usr/bin/env bash
# Engine speed, kvroute vs llama.cpp, side by side on the same model file and the same cores
# (issue 4): llama.cpp's llama-batched-bench and `kvroute-agent bench`, run ALTERNATELY for
# --rounds rounds each (the order flips every round, so drifting machine load hits both alike),
# then the medians of prefill and decode tok/s per batch size and the kvroute / llama.cpp ratios
# as a Markdown table (bench/summarize.py), with the machine, the date and the load average.
#
# usage: bench/compare-llamacpp.sh [--rounds 5] [--threads N] [--batch 1,4,16]
#                                  [--prompt-tokens 128] [--gen-tokens 64] [--cpus LIST]
#                                  [--out DIR] [--llamacpp-only]
#   --threads   compute threads for both engines (default: nproc)
#   --cpus      pin both engines to these CPUs with taskset (for example 0-1); default: no pinning
#   --out       where raw outputs and summary.md go (default: $KVROUTE_CACHE/bench/engine-<UTC time>)
#   --llamacpp-only  do not build or run kvroute-agent
# env:   KVROUTE_AGENT_BIN (default target/release/kvroute-agent, built with cargo if missing),
#        KVROUTE_MODEL_PATH, KVROUTE_CACHE, KVROUTE_LLAMACPP_VERSION, KVROUTE_BENCH_TIMEOUT
#        (seconds per engine run, default 900)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
# shellcheck source=bench/llamacpp.sh
. "$REPO/bench/llamacpp.sh"

ROUNDS=5 THREADS="$(nproc 2>/dev/null || echo 2)" BATCH=1,4,16 PP=128 TG=64 CPUS="" OUT="" ONLY_LLAMA=0
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --prompt-tokens) PP="$2"; shift 2 ;;
    --gen-tokens) TG="$2"; shift 2 ;;
    --cpus) CPUS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --llamacpp-only) ONLY_LLAMA=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
bench_need_count --rounds "$ROUNDS"
bench_need_count --threads "$THREADS"
bench_need_count --prompt-tokens "$PP"
bench_need_count --gen-tokens "$TG"
case "$BATCH" in ''|*[!0-9,]*) echo "error: --batch must be a comma-separated list of sizes, got '$BATCH'" >&2; exit 2 ;; esac

export KVROUTE_CACHE="${KVROUTE_CACHE:-$HOME/.cache/kvroute}"
OUT="${OUT:-$KVROUTE_CACHE/bench/engine-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
TIMEOUT="${KVROUTE_BENCH_TIMEOUT:-900}"

kvroute_bench_model
MODEL="$KVROUTE_MODEL_PATH"
llamacpp_ensure
BB="$LLAMACPP_BIN/llama-batched-bench"

NOTE=""
AGENT=""
if [ "$ONLY_LLAMA" = 1 ]; then
  NOTE="run with --llamacpp-only"
elif kvroute_bench_agent; then
  AGENT="$KVROUTE_AGENT"
  # The bench subcommand of issue 4 (per-batch prefill/decode); older builds had another shape.
  if ! "$AGENT" bench --help 2>/dev/null | grep -q -- '--gen-tokens' ||
     ! "$AGENT" bench --help 2>/dev/null | grep -q -- '--batch'; then
    NOTE="$AGENT has no \`bench --gen-tokens --batch\` (issue 4's bench command is not in this build)"
    AGENT=""
  fi
else
  NOTE="no kvroute-agent binary (set KVROUTE_AGENT_BIN or build with cargo build --release -p kvroute-agent)"
fi

PIN=()
if [ -n "$CPUS" ]; then
  command -v taskset >/dev/null 2>&1 || { echo "error: --cpus needs taskset (util-linux)" >&2; exit 2; }
  PIN=(taskset -c "$CPUS")
fi
TO=()
command -v timeout >/dev/null 2>&1 && TO=(timeout "$TIMEOUT")

LLAMA_CMD=("$BB" -m "$MODEL" -c 8192 -b 2048 -ub 512 -npp "$PP" -ntg "$TG" -npl "$BATCH"
           -t "$THREADS" -tb "$THREADS" --output-format jsonl)
KV_CMD=()
if [ -n "$AGENT" ]; then
  KV_CMD=("$AGENT" bench --model "$MODEL" --prompt-tokens "$PP" --gen-tokens "$TG" --batch "$BATCH"
          --threads "$THREADS" --json)
fi

{
  bench_machine_info
  echo "threads: $THREADS${CPUS:+, pinned to CPUs $CPUS}"
  echo "model: $(basename "$MODEL") ($(du -h "$MODEL" | cut -f1))"
  echo "llama.cpp: vendored by llama-cpp-python $LLAMACPP_PY_VERSION, $("$BB" --version 2>&1 | grep -m1 -i 'version' || echo 'version unknown')"
  echo "kvroute: $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)${AGENT:+ ($AGENT)}"
  echo "rounds: $ROUNDS each, alternating (odd rounds llama.cpp first, even rounds kvroute first)"
  echo "llama.cpp command: ${PIN[*]:+${PIN[*]} }$(basename "$BB") ${LLAMA_CMD[*]:1}"
  if [ -n "$AGENT" ]; then echo "kvroute command: ${PIN[*]:+${PIN[*]} }kvroute-agent ${KV_CMD[*]:1}"; fi
} >"$OUT/meta.txt"

run_llama() { # ROUND
  echo "[bench] round $1/$ROUNDS: llama-batched-bench" >&2
  if ! "${TO[@]}" "${PIN[@]}" "${LLAMA_CMD[@]}" >"$OUT/llamacpp-r$1.jsonl" 2>"$OUT/llamacpp-r$1.log"; then
    echo "[bench] llama-batched-bench failed in round $1; last lines of its log:" >&2
    tail -n 20 "$OUT/llamacpp-r$1.log" >&2
    return 1
  fi
}
run_kvroute() { # ROUND
  [ -n "$AGENT" ] || return 0
  echo "[bench] round $1/$ROUNDS: kvroute-agent bench" >&2
  if ! "${TO[@]}" "${PIN[@]}" "${KV_CMD[@]}" >"$OUT/kvroute-r$1.jsonl" 2>"$OUT/kvroute-r$1.log"; then
    echo "[bench] kvroute-agent bench failed in round $1; last lines of its log:" >&2
    tail -n 20 "$OUT/kvroute-r$1.log" >&2
    NOTE="kvroute-agent bench failed (see $OUT/kvroute-r$1.log)"
    return 1
  fi
}

FAILED=0
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then
    run_llama "$r" || FAILED=1
    run_kvroute "$r" || FAILED=1
  else
    run_kvroute "$r" || FAILED=1
    run_llama "$r" || FAILED=1
  fi
done
echo "load average at end (1/5/15 min): $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)" >>"$OUT/meta.txt"
echo "raw outputs: $OUT" >>"$OUT/meta.txt"

python3 "$REPO/bench/summarize.py" engine "$OUT" --note "$NOTE" | tee "$OUT/summary.md"
python3 "$REPO/bench/summarize.py" engine "$OUT" --json >"$OUT/summary.json"
exit "$FAILED"
