#!/usr/bin/env bash
# Routing quality: `kvroute up --agents 2` with small KV pools, the same workload
# (bench/workload.py: shared-prefix conversations mixed with long and short requests) under each
# policy in turn; prints a table of completed requests, 429s, output tokens/s, TTFT p50/p99 and
# the agents' preemptions (sum of `vllm:num_preemptions` from their /metrics).
#
# Usage: bench/routing-quality.sh [REQUESTS=200] [CONCURRENCY=32] [KV_MEMORY=64MiB]
# KVROUTE_AGENT_BIN selects the agent (default: target/release/kvroute-agent). With the stub agent
# (target/release/examples/stub_agent, a simulated KV pool) the table measures admission and
# placement only, not a model; give it a per-token delay with AGENT_ARGS=--agent-arg=--token-delay-ms=5.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS="${1:-200}"
CONCURRENCY="${2:-32}"
KV="${3:-64MiB}"
cargo build --release -q -p kvroute-operator --bin kvroute
export KVROUTE_AGENT_BIN="${KVROUTE_AGENT_BIN:-$PWD/target/release/kvroute-agent}"
WORK="$(mktemp -d)"
UP_PID=""
cleanup() {
  if [ -n "$UP_PID" ]; then kill -TERM "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-16s %9s %5s %6s %10s %10s %10s %11s %8s\n' policy completed 429 errors "tok/s" "TTFT p50" "TTFT p99" preemptions seconds
for policy in kv round-robin least-requests gpu-utilization; do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  RUST_LOG=warn target/release/kvroute up --agents 2 --kv-memory "$KV" --policy "$policy" \
    --listen "127.0.0.1:$port" --queue-timeout 120s ${AGENT_ARGS:-} >"$WORK/up.out" 2>"$WORK/up.err" &
  UP_PID=$!
  for _ in $(seq 1 6000); do
    grep -q '^READY ' "$WORK/up.out" && break
    kill -0 "$UP_PID" 2>/dev/null || { cat "$WORK/up.err" >&2; exit 1; }
    sleep 0.1
  done
  url=$(sed -n 's/^READY //p' "$WORK/up.out")
  res=$(python3 bench/workload.py "$url" "$REQUESTS" "$CONCURRENCY")
  pre=0
  # "agent ID pid PID http://HOST:PORT grpc://HOST:PORT"
  for a in $(awk '/^agent / {print $5}' "$WORK/up.out"); do
    p=$(curl -sf "$a/metrics" | awk '/^vllm:num_preemptions(_total)?[ {]/ {s+=$NF} END {print s+0}')
    pre=$((pre + ${p%.*}))
  done
  python3 - "$policy" "$res" "$pre" <<'PY'
import json, sys
p, r, pre = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
print(f"{p:<16} {r['completed']:>9} {r['rate_limited']:>5} {r['errors']:>6} {r['output_tokens_per_s']:>10} "
      f"{r['ttft_p50_ms']:>8}ms {r['ttft_p99_ms']:>8}ms {pre:>11} {r['seconds']:>8}")
PY
  kill -TERM "$UP_PID"; wait "$UP_PID" || true; UP_PID=""
done
echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
