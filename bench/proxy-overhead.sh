#!/usr/bin/env bash
# Proxy overhead: the kvroute gateway vs nginx as a reverse proxy in front of the same stub
# upstream (operator/examples/stub_agent.rs: a simulated agent that answers at once), on loopback,
# driven by the same load tool (wrk). Prints requests/s and p50 latency for the upstream direct,
# through nginx and through the gateway, and the gateway/nginx ratios
# (targets: throughput >= 0.8x nginx, p50 <= 1.5x nginx).
#
# Usage: bench/proxy-overhead.sh [DURATION=10s] [CONNECTIONS=32] [THREADS=2]
# Needs: nginx and wrk (Debian packages; installed with apt-get when missing and running as root).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10s}"
CONNS="${2:-32}"
THREADS="${3:-2}"

need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >/dev/null
  else
    echo "error: $1 not found; install the Debian package $2" >&2
    exit 1
  fi
}
need nginx nginx
need wrk wrk

cargo build --release -q -p kvroute-operator --bin kvroute --example stub_agent
BIN=target/release
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_HTTP=$(port); UP_GRPC=$(port); GW=$(port); NG=$(port)

"$BIN/examples/stub_agent" serve --http "127.0.0.1:$UP_HTTP" --grpc "127.0.0.1:$UP_GRPC" \
  --agent-id stub --kv-memory 1GiB 2>"$WORK/stub.log" &
PIDS+=($!)
RUST_LOG=warn "$BIN/kvroute" gateway --auth off --listen "127.0.0.1:$GW" \
  --agent "http://127.0.0.1:$UP_HTTP,grpc://127.0.0.1:$UP_GRPC" --max-queue 100000 \
  2>"$WORK/gateway.log" &
PIDS+=($!)

cat >"$WORK/nginx.conf" <<NGINX
worker_processes auto;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/body;
  proxy_temp_path $WORK/proxy;
  fastcgi_temp_path $WORK/fastcgi;
  uwsgi_temp_path $WORK/uwsgi;
  scgi_temp_path $WORK/scgi;
  upstream stub { server 127.0.0.1:$UP_HTTP; keepalive 256; }
  server {
    listen 127.0.0.1:$NG;
    location / {
      proxy_pass http://stub;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGINX
nginx -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)

cat >"$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"default","prompt":"hello","max_tokens":1}'
wrk.headers["Content-Type"] = "application/json"
LUA

for i in $(seq 1 200); do
  if curl -sf "http://127.0.0.1:$GW/ready" >/dev/null 2>&1 &&
     curl -sf -o /dev/null "http://127.0.0.1:$NG/ready" 2>/dev/null; then break; fi
  sleep 0.1
done
curl -sf "http://127.0.0.1:$GW/v1/completions" -H 'content-type: application/json' \
  -d '{"model":"default","prompt":"hello","max_tokens":1}' >/dev/null

# wrk's "50%" latency in microseconds.
to_us() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); print v} else if (v ~ /ms$/) {sub(/ms$/,"",v); print v*1000} else if (v ~ /s$/) {sub(/s$/,"",v); print v*1000000}}'; }
run() { # NAME URL
  wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$WORK/post.lua" "$2/v1/completions" >"$WORK/$1.txt"
  local rps p50 non2xx
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$WORK/$1.txt")
  p50=$(awk '$1=="50%" {print $2}' "$WORK/$1.txt" | to_us)
  non2xx=$(awk '/Non-2xx/ {print $5}' "$WORK/$1.txt")
  printf '%-10s %12s req/s   p50 %10s us   non-2xx %s\n' "$1" "$rps" "$p50" "${non2xx:-0}"
  eval "RPS_$1=$rps; P50_$1=$p50"
}

echo "wrk -t$THREADS -c$CONNS -d$DURATION, POST /v1/completions (stub upstream answers at once)"
run direct "http://127.0.0.1:$UP_HTTP"
run nginx "http://127.0.0.1:$NG"
run gateway "http://127.0.0.1:$GW"
awk -v gr="$RPS_gateway" -v nr="$RPS_nginx" -v gp="$P50_gateway" -v np="$P50_nginx" 'BEGIN {
  printf "gateway/nginx: throughput %.2fx (target >= 0.8x), p50 latency %.2fx (target <= 1.5x)\n", gr/nr, gp/np }'
