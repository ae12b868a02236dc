#!/usr/bin/env bash
# Serving, kvroute-agent vs llama.cpp's llama-server (issue 5, item 8): same model file, same
# threads, same load. Each server is started in turn on 127.0.0.1 (llama-server with --parallel
# <clients> and continuous batching; `kvroute-agent serve`), driven by bench/load.py (N concurrent
# streaming clients through the official openai client, fixed prompt and output lengths), and
# stopped; the order flips every round. Prints the medians of completed requests/s, output
# tokens/s and TTFT p50/p99 for both and the kvroute / llama-server ratios (bench/summarize.py).
#
# usage: bench/compare-llama-server.sh [--clients 8] [--requests N] [--prompt-tokens 128]
#                                      [--max-tokens 64] [--threads N] [--rounds 3]
#                                      [--kv-memory 1GiB] [--cpus LIST] [--deadline 600]
#                                      [--out DIR] [--llama-only]
#   --requests  requests per run (default: 4 per client)
#   --threads   compute threads for both servers (default: nproc)
#   --cpus      pin both servers to these CPUs with taskset (for example 0-1); default: none
#   --deadline  seconds per load run; unfinished requests count as failed (default 600)
#   --out       raw outputs, server logs, summary.md (default $KVROUTE_CACHE/bench/server-<UTC time>)
#   --llama-only  do not build or run kvroute-agent
# env:   KVROUTE_AGENT_BIN, KVROUTE_MODEL_PATH, KVROUTE_CACHE, KVROUTE_LLAMACPP_VERSION
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
# shellcheck source=bench/llamacpp.sh
. "$REPO/bench/llamacpp.sh"

CLIENTS=8 REQUESTS="" PP=128 MAXTOK=64 THREADS="$(nproc 2>/dev/null || echo 2)" ROUNDS=3
KVMEM=1GiB CPUS="" DEADLINE=600 OUT="" ONLY_LLAMA=0
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --clients) CLIENTS="$2"; shift 2 ;;
    --requests) REQUESTS="$2"; shift 2 ;;
    --prompt-tokens) PP="$2"; shift 2 ;;
    --max-tokens) MAXTOK="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --kv-memory) KVMEM="$2"; shift 2 ;;
    --cpus) CPUS="$2"; shift 2 ;;
    --deadline) DEADLINE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --llama-only) ONLY_LLAMA=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
REQUESTS="${REQUESTS:-$((4 * ${CLIENTS:-0}))}"
bench_need_count --clients "$CLIENTS"
bench_need_count --requests "$REQUESTS"
bench_need_count --prompt-tokens "$PP"
bench_need_count --max-tokens "$MAXTOK"
bench_need_count --threads "$THREADS"
bench_need_count --rounds "$ROUNDS"
bench_need_count --deadline "$DEADLINE"

export KVROUTE_CACHE="${KVROUTE_CACHE:-$HOME/.cache/kvroute}"
OUT="${OUT:-$KVROUTE_CACHE/bench/server-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"

kvroute_bench_model
MODEL="$KVROUTE_MODEL_PATH"
llamacpp_ensure
LLAMA_SERVER="$LLAMACPP_BIN/llama-server"
bench_venv

NOTE=""
AGENT=""
if [ "$ONLY_LLAMA" = 1 ]; then
  NOTE="run with --llama-only"
elif kvroute_bench_agent; then
  AGENT="$KVROUTE_AGENT"
  if ! "$AGENT" serve --help 2>/dev/null | grep -q -- '--http'; then
    NOTE="$AGENT has no \`serve --http\` (issue 5's serve command is not in this build)"
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

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# llama-server's context is split over its slots: give each slot the prompt, the output and some
# room. Continuous batching is llama-server's default; -cb says so explicitly.
CTX=$((CLIENTS * (PP + MAXTOK + 64)))
CMD=()
llama_cmd() { # PORT -> CMD
  CMD=("$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port "$1" -t "$THREADS" -tb "$THREADS"
       -c "$CTX" --parallel "$CLIENTS" -cb --no-webui)
}
kvroute_cmd() { # HTTP_PORT GRPC_PORT -> CMD
  CMD=("$AGENT" serve --model "$MODEL" --http "127.0.0.1:$1" --grpc "127.0.0.1:$2"
       --kv-memory "$KVMEM" --threads "$THREADS")
  # The CPU engine is what is compared; say so where the agent has a device choice.
  if "$AGENT" serve --help 2>/dev/null | grep -q -- '--device'; then CMD+=(--device cpu); fi
}

run_one() { # NAME ROUND
  local name="$1" r="$2" port ready
  port="$(free_port)"
  if [ "$name" = llama-server ]; then
    llama_cmd "$port"
    ready="http://127.0.0.1:$port/health"
  else
    kvroute_cmd "$port" "$(free_port)"
    ready="http://127.0.0.1:$port/ready"
  fi
  echo "[bench] round $r/$ROUNDS: $name on 127.0.0.1:$port" >&2
  "${PIN[@]}" "${CMD[@]}" >"$OUT/$name-r$r.log" 2>&1 &
  SERVER_PID=$!
  local rc=0
  "$BENCH_PYTHON" "$REPO/bench/load.py" --base-url "http://127.0.0.1:$port/v1" --server "$name" \
    --clients "$CLIENTS" --requests "$REQUESTS" --prompt-tokens "$PP" --max-tokens "$MAXTOK" \
    --deadline "$DEADLINE" --wait-ready "$ready" --ready-timeout 300 --server-pid "$SERVER_PID" --seed "$r" \
    >"$OUT/$name-r$r.json" || rc=$?
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "[bench] $name exited early; last lines of its log:" >&2
    tail -n 20 "$OUT/$name-r$r.log" >&2
    rc=1
  fi
  stop_server
  if [ "$rc" != 0 ]; then
    echo "[bench] $name round $r: load run failed or incomplete (rc $rc), see $OUT/$name-r$r.log" >&2
  fi
  return "$rc"
}

{
  bench_machine_info
  echo "threads: $THREADS${CPUS:+, pinned to CPUs $CPUS}"
  echo "model: $(basename "$MODEL") ($(du -h "$MODEL" | cut -f1))"
  echo "load: $CLIENTS concurrent streaming clients, $REQUESTS requests per run, $PP prompt tokens (token ids), exactly $MAXTOK output tokens (ignore_eos), greedy"
  echo "llama.cpp: vendored by llama-cpp-python $LLAMACPP_PY_VERSION, $("$LLAMA_SERVER" --version 2>&1 | grep -m1 -i 'version' || echo 'version unknown')"
  echo "kvroute: $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)${AGENT:+ ($AGENT)}"
  echo "rounds: $ROUNDS per server, alternating (odd rounds llama-server first)"
  llama_cmd PORT
  echo "llama-server command: ${PIN[*]:+${PIN[*]} }llama-server ${CMD[*]:1}"
  if [ -n "$AGENT" ]; then
    kvroute_cmd PORT GRPC_PORT
    echo "kvroute command: ${PIN[*]:+${PIN[*]} }kvroute-agent ${CMD[*]:1}"
  fi
  echo "load command: load.py --base-url http://127.0.0.1:PORT/v1 --server NAME --clients $CLIENTS --requests $REQUESTS --prompt-tokens $PP --max-tokens $MAXTOK --deadline $DEADLINE"
} >"$OUT/meta.txt"

FAILED=0
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order="llama-server kvroute"; else order="kvroute llama-server"; fi
  for name in $order; do
    if [ "$name" = kvroute ] && [ -z "$AGENT" ]; then continue; fi
    run_one "$name" "$r" || FAILED=1
  done
done
echo "load average at end (1/5/15 min): $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)" >>"$OUT/meta.txt"
echo "raw outputs: $OUT" >>"$OUT/meta.txt"

python3 "$REPO/bench/summarize.py" server "$OUT" --note "$NOTE" | tee "$OUT/summary.md"
python3 "$REPO/bench/summarize.py" server "$OUT" --json >"$OUT/summary.json"
exit "$FAILED"
