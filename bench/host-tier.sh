#!/usr/bin/env bash
# The KV host tier side by side (issue 18): multi-turn conversations through a kvroute gateway in
# front of two fresh CPU agents whose KV cache is too small to keep every conversation, once
# without a host tier and once with `--kv-offload-memory`, alternating, in the same sitting.
# Prints, per setup, the prompt tokens the agents computed (queried minus cache hits, from their
# /metrics), the hits copied back from the host tier, TTFT p50/p99 and output tok/s.
#
# usage: bench/host-tier.sh [--no-build] [--rounds N] [--conversations C] [--turns T]
#                           [--kv-memory 32MiB] [--offload 256MiB] [--out FILE]
#
# Needs: a Rust toolchain (unless --no-build), Python 3 with the `openai` package
# ($KVROUTE_PYTHON, else the venv scripts/test.sh makes under $KVROUTE_CACHE), curl.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=1 ROUNDS=1 CONV=32 TURNS=6 KV_MEMORY=32MiB OFFLOAD=256MiB OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --rounds) ROUNDS="$2"; shift ;;
    --conversations) CONV="$2"; shift ;;
    --turns) TURNS="$2"; shift ;;
    --kv-memory) KV_MEMORY="$2"; shift ;;
    --offload) OFFLOAD="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$ROUNDS$CONV$TURNS" in *[!0-9]*|"") echo "error: --rounds, --conversations and --turns take whole numbers" >&2; exit 2 ;; esac

KVROUTE_CACHE="${KVROUTE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvroute}"
PY="${KVROUTE_PYTHON:-$KVROUTE_CACHE/venv-openai/bin/python}"
"$PY" -c 'import openai' 2>/dev/null || { echo "error: $PY cannot import openai (run scripts/test.sh once, or set KVROUTE_PYTHON)" >&2; exit 1; }

if [ "$BUILD" = 1 ]; then
  cargo build --release --bins -q
fi
AGENT_BIN=target/release/kvroute-agent GATEWAY_BIN=target/release/kvroute
for b in "$AGENT_BIN" "$GATEWAY_BIN"; do [ -x "$b" ] || { echo "error: $b missing (drop --no-build)" >&2; exit 1; }; done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvroute-host-tier-XXXXXX")"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
start() { local name="$1"; shift; setsid "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" </dev/null & STARTED_PID=$!; PIDS+=("$STARTED_PID"); }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
stop_all() { for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
metric() { # URL NAME: the sample's value (0 when absent)
  curl -sf "$1/metrics" | awk -v n="$2" '$1 ~ "^"n"({|$)" { v=$NF } END { print (v=="" ? 0 : v) }'
}

run_one() { # SETUP (plain|host) ROUND
  local setup="$1" round="$2" i line extra=()
  [ "$setup" = host ] && extra=(--kv-offload-memory "$OFFLOAD")
  for i in 1 2; do
    start "agent$i" "$AGENT_BIN" serve --model default --kv-memory "$KV_MEMORY" --threads 1 \
      --http 127.0.0.1:0 --grpc 127.0.0.1:0 --drain-timeout 1s --agent-id "agent$i" "${extra[@]}"
  done
  local urls=() agents=()
  for i in 1 2; do
    for _ in $(seq 1 1800); do grep -q '^kvroute-agent ready' "$WORK/agent$i.out" && break; sleep 0.1; done
    grep -q '^kvroute-agent ready' "$WORK/agent$i.out" || { tail -n 20 "$WORK/agent$i.err" >&2; return 1; }
    line="$(grep '^kvroute-agent listening' "$WORK/agent$i.out")"
    local h g
    h="$(sed 's/.*http=\([^ ]*\).*/\1/' <<<"$line")"; g="$(sed 's/.*grpc=\([^ ]*\).*/\1/' <<<"$line")"
    urls+=("http://$h"); agents+=(--agent "http://$h,grpc://$g")
  done
  local port; port="$(free_port)"
  start gateway "$GATEWAY_BIN" gateway --auth off --listen "127.0.0.1:$port" --policy kv "${agents[@]}" --queue-timeout 900s
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break; sleep 0.1; done
  local model; model="$(curl -sf "${urls[0]}/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
  local res
  res="$("$PY" bench/multiturn.py --base-url "http://127.0.0.1:$port/v1" --model "$model" \
    --conversations "$CONV" --turns "$TURNS" --seed "$round")"
  local q=0 hit=0 host=0 reload=0 off=0 pre=0 u
  for u in "${urls[@]}"; do
    q=$((q + $(metric "$u" kvroute_prefix_cache_query_tokens_total | cut -d. -f1)))
    hit=$((hit + $(metric "$u" kvroute_prefix_cache_hit_tokens_total | cut -d. -f1)))
    host=$((host + $(metric "$u" kvroute_prefix_cache_host_hit_tokens_total | cut -d. -f1)))
    reload=$((reload + $(metric "$u" kvroute_kv_reloaded_blocks_total | cut -d. -f1)))
    off=$((off + $(metric "$u" kvroute_kv_offloaded_blocks_total | cut -d. -f1)))
    pre=$((pre + $(metric "$u" kvroute_preemptions_total | cut -d. -f1)))
  done
  stop_all
  python3 - "$setup" "$round" "$res" "$q" "$hit" "$host" "$reload" "$off" "$pre" <<'EOF'
import json, sys
setup, rnd, res = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
q, hit, host, reload, off, pre = map(int, sys.argv[4:])
f = lambda v: "-" if v is None else f"{v:.2f}s"
print(f"{setup:<6} {rnd:>5} {q - hit:>9} {q:>8} {100 * hit / max(q, 1):>5.1f}% {host:>9} {off:>8} {reload:>8} "
      f"{f(res['ttft_p50_s']):>8} {f(res['ttft_p99_s']):>8} {f(res['ttft_later_turns_p50_s']):>9} "
      f"{res['output_tok_s']:>7.1f} {res['completed']:>4}/{res['failed']:<3} {pre:>4} {res['wall_s']:>6.1f}s")
EOF
}

{
  echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# kvroute $(git rev-parse --short HEAD 2>/dev/null || echo '?'); two agents, --kv-memory $KV_MEMORY, 1 thread each; host tier: --kv-offload-memory $OFFLOAD; gateway --policy kv"
  echo "# $CONV conversations x $TURNS turns (bench/multiturn.py defaults otherwise); computed = prompt tokens queried - cache hits (agents' /metrics)"
  echo "setup  round  computed  queried   hit  host-hit offloaded reloaded TTFT p50 TTFT p99 later p50 tok/s   ok/failed preempt wall"
  for r in $(seq 1 "$ROUNDS"); do
    # Alternate which setup goes first, so drift on the machine does not favour one.
    if [ $((r % 2)) = 1 ]; then order="plain host"; else order="host plain"; fi
    for s in $order; do run_one "$s" "$r"; done
  done
  echo "# load average at end $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee ${OUT:+"$OUT"}
