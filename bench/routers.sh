#!/usr/bin/env bash
# HTTP routers side by side in front of the same two kvroute agents: the kvroute gateway (policy kv
# and round-robin) against sglang-router, smg (Shepherd Model Gateway) and vllm-router, each with
# its defaults (cache_aware) and one tuned variant. Every run starts two FRESH agents (default
# model, 32 MiB KV pool = 91 blocks = 1,456 tokens, 1 compute thread each), the router in front of
# them, and the load generator of the Gateway API Inference Extension, inference-perf (streaming
# /v1/completions, ignore_eos, closed loop), then reads inference-perf's report (throughput,
# goodput, TTFT, TPOT) and the agents' /metrics (prefix-cache hits, preemptions), and stops it all.
# For kvroute's gateway it also reads its decision log (--decision-log 1000, /dashboard/decisions;
# kept as decisions.json with --keep): of the requests with part of their prompt cached or in
# flight somewhere, how many went to an agent holding less of it ("moved"; "cold": nothing of it),
# and the cost term that decided each move.
#
# Usage: bench/routers.sh [--rounds N] [--workloads LIST] [--routers LIST] [--requests N]
#                         [--concurrency N] [--quick] [--out FILE] [--slo-ttft S] [--slo-tpot S]
#                         [--kv-memory SIZE] [--no-build] [--keep] [--help]
# Examples:
#   bench/routers.sh --quick --routers kv,sglang --workloads shared-prefix     # smoke test
#   bench/routers.sh --out routers.jsonl                                       # everything, 3 rounds
#
# Routers: kv, kv-slo (kv told the benchmark's SLOs: --slo-ttft, --slo-tpot), kv-fifo (kv with
# the admission queue in arrival order), kv-cf2 (kv with cached prefixes first for 2 s only),
# kv-no-holds (kv without prefix holds), kv-no-keep
# (kv without keeping a finished turn's blocks for its next turn, and cached prefixes first for
# 2 s only: the defaults before 2026-12-07), kv-score,
# round-robin, cache-aware and llm-d (kvroute's gateway running its re-implementations of the
# peers' policies: a check of those against the peers themselves), and the peers with and
# without -tuned. KVROUTE_BENCH_GATEWAY_FLAGS adds flags to every kvroute
# gateway (experiments, e.g. "--cost-duplicate 2"); KVROUTE_BENCH_AGENT_FLAGS to every agent
# (e.g. "--optimistic-admission", vLLM's start-on-prompt-fit, as the agents ran before 2026-12-06).
#
# Peers and the load generator are installed with pip into
# ${KVROUTE_CACHE:-$HOME/.cache/kvroute}/bench-routers (one venv per peer: sglang-router and smg
# both install an `smg` command). inference-perf needs Python >= 3.12: found on PATH (python3.13,
# python3.12, python3) or under `pyenv root`.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

CALLER_PWD="$PWD"
cd "$(dirname "$0")/.."

ALL_WORKLOADS=(shared-prefix shared-prefix-long multi-turn no-sharing mixed-long)
ALL_ROUTERS=(kv kv-slo kv-fifo kv-cf2 kv-no-holds kv-no-keep kv-score round-robin cache-aware llm-d sglang sglang-tuned smg smg-tuned vllm-router vllm-router-tuned)

ROUNDS=3
ROUNDS_SET=0
WORKLOADS="all"
ROUTERS="all"
REQUESTS=0
CONCURRENCY=0
QUICK=0
OUT=""
SLO_TTFT=2
SLO_TPOT=0.1
KV_MEMORY=32MiB
BUILD=1
KEEP=0

need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_number() { [[ "$1" =~ ^[0-9]+([.][0-9]+)?$|^[.][0-9]+$ ]]; }

while [ $# -gt 0 ]; do
  arg="$1"
  # --flag=value is the same as --flag value.
  if [[ "$arg" == --*=* ]]; then set -- "${arg%%=*}" "${arg#*=}" "${@:2}"; arg="$1"; fi
  case "$arg" in
    --rounds) need_value "$@"; ROUNDS="$2"; ROUNDS_SET=1; shift 2 ;;
    --workloads) need_value "$@"; WORKLOADS="$2"; shift 2 ;;
    --routers) need_value "$@"; ROUTERS="$2"; shift 2 ;;
    --requests) need_value "$@"; REQUESTS="$2"; shift 2 ;;
    --concurrency) need_value "$@"; CONCURRENCY="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --slo-ttft) need_value "$@"; SLO_TTFT="$2"; shift 2 ;;
    --slo-tpot) need_value "$@"; SLO_TPOT="$2"; shift 2 ;;
    --kv-memory) need_value "$@"; KV_MEMORY="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done

is_uint "$ROUNDS" && [ "$ROUNDS" -ge 1 ] || die "--rounds must be a whole number >= 1, got '$ROUNDS'"
is_uint "$REQUESTS" || die "--requests must be a whole number, got '$REQUESTS'"
is_uint "$CONCURRENCY" || die "--concurrency must be a whole number, got '$CONCURRENCY'"
is_number "$SLO_TTFT" || die "--slo-ttft must be a number of seconds, got '$SLO_TTFT'"
is_number "$SLO_TPOT" || die "--slo-tpot must be a number of seconds (0.1 = 100 ms), got '$SLO_TPOT'"
[[ "$KV_MEMORY" =~ ^[0-9]+(KiB|MiB|GiB)?$ ]] || die "--kv-memory must look like 32MiB, got '$KV_MEMORY'"
if [ "$QUICK" = 1 ]; then
  [ "$ROUNDS_SET" = 1 ] || ROUNDS=1
  # 3 requests per shared-prefix group, 3 turns per conversation: enough to see cache hits.
  [ "$REQUESTS" -gt 0 ] || REQUESTS=24
fi

# Validates a comma list against the known names; prints the chosen names one a line.
pick() { # KIND LIST KNOWN...
  local kind="$1" list="$2"; shift 2
  if [ "$list" = all ]; then printf '%s\n' "$@"; return; fi
  local IFS=,
  for x in $list; do
    [ -n "$x" ] || continue
    printf '%s\n' "$@" | grep -qx -- "$x" || { echo "error: unknown $kind '$x'; known: $* (or all)" >&2; return 1; }
    echo "$x"
  done
}
WL_TEXT="$(pick workload "$WORKLOADS" "${ALL_WORKLOADS[@]}")" || exit 2
RT_TEXT="$(pick router "$ROUTERS" "${ALL_ROUTERS[@]}")" || exit 2
[ -n "$WL_TEXT" ] || die "--workloads selects nothing"
[ -n "$RT_TEXT" ] || die "--routers selects nothing"
mapfile -t WL <<<"$WL_TEXT"
mapfile -t RT <<<"$RT_TEXT"
# Catches --requests a workload cannot take (too many turns for the pool) before anything starts.
for w in "${WL[@]}"; do
  python3 bench/routers/workloads.py config "$w" --base-url http://check --model check --tokenizer check \
    --report-dir check --requests "$REQUESTS" --concurrency "$CONCURRENCY" >/dev/null || exit 2
done
if [ -n "$OUT" ]; then
  case "$OUT" in /*) ;; *) OUT="$CALLER_PWD/$OUT" ;; esac
  : >"$OUT" || die "cannot write --out file $OUT"
fi

# Same rule as the engine's cache (engine/src/fetch.rs), exported so the agents use that folder.
if [ -n "${KVROUTE_CACHE:-}" ]; then CACHE="$KVROUTE_CACHE"
elif [ -n "${XDG_CACHE_HOME:-}" ]; then CACHE="$XDG_CACHE_HOME/kvroute"
else CACHE="$HOME/.cache/kvroute"; fi
export KVROUTE_CACHE="$CACHE"
BENCH="$CACHE/bench-routers"
mkdir -p "$BENCH"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvroute-routers-XXXXXX")"
PIDS=()

# Every process is started with setsid, so it leads its own process group: stopping the group also
# stops anything it spawned, and a Ctrl-C at the terminal reaches this script only (the trap then
# stops the groups, agents get time to drain).
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_all
  if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then echo "# logs and reports kept in $WORK" >&2; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

start() { # NAME CMD... ; sets STARTED_PID
  local name="$1"; shift
  setsid "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" </dev/null &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- binaries ------------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  echo "# cargo build --release --bins" >&2
  cargo build --release --bins -q || die "cargo build failed (--no-build uses the binaries in target/release as they are)"
fi
for b in kvroute kvroute-agent; do [ -x "target/release/$b" ] || die "target/release/$b missing: run cargo build --release --bins"; done
# A copy, so that a rebuild in the middle of a long run does not change what is measured.
mkdir -p "$WORK/bin"
cp target/release/kvroute target/release/kvroute-agent "$WORK/bin/"
GATEWAY_BIN="$WORK/bin/kvroute"
AGENT_BIN="$WORK/bin/kvroute-agent"
export RUST_LOG="${RUST_LOG:-warn}"

# --- Python >= 3.12 and the venvs -----------------------------------------------------------------
find_python() {
  local c exe v
  for c in python3.13 python3.12 python3; do
    command -v "$c" >/dev/null 2>&1 || continue
    # A pyenv shim for a version that is not active fails here, which is what we want.
    exe="$("$c" -c 'import sys; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null)" || continue
    echo "$exe"; return 0
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(ls -d "$(pyenv root)"/versions/3.* 2>/dev/null | sort -t. -k2,2nr -k3,3nr); do
      exe="$("$v/bin/python3" -c 'import sys; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null)" || continue
      echo "$exe"; return 0
    done
  fi
  return 1
}
PY312="$(find_python)" || die "inference-perf needs Python >= 3.12: none found (tried python3.13, python3.12, python3, pyenv versions)"

# ensure_venv NAME PACKAGE... : a venv in $BENCH/venv-NAME holding the packages; returns 1 (and
# says why) when they cannot be installed. Checks the index first so that a name missing there is
# a one-line skip rather than a pip traceback.
ensure_venv() {
  local name="$1"; shift
  local venv="$BENCH/venv-$name" log="$BENCH/venv-$name.log" p
  if [ -f "$venv/.complete" ]; then return 0; fi
  for p in "$@"; do
    if ! "$PY312" -m pip index versions "$p" >/dev/null 2>&1 \
      && ! "$PY312" -m pip download --no-deps -q -d "$(mktemp -d "$WORK/pip-XXXXXX")" "$p" >/dev/null 2>&1; then
      echo "# skip $name: package '$p' not found on the package index (or not for Python $("$PY312" -c 'import platform; print(platform.python_version())'))" >&2
      return 1
    fi
  done
  echo "# installing $* into $venv" >&2
  rm -rf "$venv"
  if "$PY312" -m venv "$venv" >"$log" 2>&1 \
    && "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@" >>"$log" 2>&1; then
    touch "$venv/.complete"
    return 0
  fi
  echo "# skip $name: pip install $* failed (see $log)" >&2
  return 1
}
pkg_version() { "$BENCH/venv-$1/bin/python" -c "import importlib.metadata as m; print(m.version('$2'))" 2>/dev/null || echo "?"; }

ensure_venv loadgen inference-perf gguf || die "inference-perf is needed to drive the load"
LOADGEN_PY="$BENCH/venv-loadgen/bin/python"
VERSIONS="inference-perf $(pkg_version loadgen inference-perf), transformers $(pkg_version loadgen transformers)"

declare -A PEER_OK=()
for peer in sglang smg vllm-router; do
  printf '%s\n' "${RT[@]}" | grep -q "^$peer\(-tuned\)\?$" || continue
  case "$peer" in
    sglang) pkg=sglang-router ;;
    smg) pkg=smg ;;
    vllm-router) pkg=vllm-router ;;
  esac
  if ensure_venv "$peer" "$pkg"; then
    PEER_OK[$peer]=1
    VERSIONS="$VERSIONS, $pkg $(pkg_version "$peer" "$pkg")"
  fi
done
ROUTERS_RUN=()
for r in "${RT[@]}"; do
  base="${r%-tuned}"
  case "$base" in kv|kv-slo|kv-fifo|kv-cf2|kv-no-holds|kv-no-keep|kv-score|round-robin|cache-aware|llm-d) ROUTERS_RUN+=("$r") ;; *) [ -n "${PEER_OK[$base]:-}" ] && ROUTERS_RUN+=("$r") ;; esac
done
[ ${#ROUTERS_RUN[@]} -gt 0 ] || die "none of the selected routers is available"

# --- tokenizer for inference-perf ------------------------------------------------------------------
# `tokenize` fetches the default model into the cache on first use; the tokenizer comes from it.
"$AGENT_BIN" tokenize --model default "warm up" >/dev/null 2>"$WORK/fetch.err" || { cat "$WORK/fetch.err" >&2; die "cannot load the default model"; }
GGUF="$(ls "$CACHE"/models/*.gguf 2>/dev/null | head -n1)"
[ -n "$GGUF" ] || die "no GGUF under $CACHE/models after fetching the default model"
TOKENIZER="$BENCH/tokenizer"
HF_HUB_OFFLINE=1 "$LOADGEN_PY" bench/routers/tokenizer.py --gguf "$GGUF" --out "$TOKENIZER" \
  --agent-bin "$AGENT_BIN" 2>"$WORK/tokenizer.err" >&2 || { cat "$WORK/tokenizer.err" >&2; die "tokenizer check failed"; }

# --- one run -------------------------------------------------------------------------------------
# The peers' tuned variant, the same for all three (their cache_aware policies share one design):
# - --balance-abs-threshold 4 --balance-rel-threshold 1.2: the default (64 requests apart and 1.5x)
#   can never trigger with 16 requests in flight, so by default these routers never balance load
#   here; with 4 / 1.2 they switch to shortest-queue once one agent has 5+ more requests in flight.
# - --max-tree-size / --eviction-interval-secs 5: the router's prefix tree approximates what each
#   worker has cached, but by default it holds 64 M characters and forgets once a minute, while
#   each agent's pool holds only 1,456 tokens (about 10 k characters of this text). A tree sized
#   to the pool stops the router from pinning a prefix to an agent that evicted it long ago.
#   (sglang-router and vllm-router bound the tree per worker, smg per model: twice the size.)
PEER_TUNED=(--balance-abs-threshold 4 --balance-rel-threshold 1.2 --eviction-interval-secs 5)

# start_agents: two fresh agents; sets H1 G1 H2 G2 (host:port of HTTP and gRPC) and MODEL.
start_agents() {
  local i line
  for i in 1 2; do
    start "agent$i" "$AGENT_BIN" serve --model default --kv-memory "$KV_MEMORY" --threads 1 \
      --http 127.0.0.1:0 --grpc 127.0.0.1:0 --drain-timeout 1s --agent-id "agent$i" \
      ${KVROUTE_BENCH_AGENT_FLAGS:-}
    eval "AGENT${i}_PID=$STARTED_PID"
  done
  for i in 1 2; do
    for _ in $(seq 1 1800); do
      grep -q '^kvroute-agent ready' "$WORK/agent$i.out" && break
      local pid_var="AGENT${i}_PID"
      kill -0 "${!pid_var}" 2>/dev/null || { tail -n 20 "$WORK/agent$i.err" >&2; return 1; }
      sleep 0.1
    done
    grep -q '^kvroute-agent ready' "$WORK/agent$i.out" || { echo "agent$i not ready after 180 s" >&2; return 1; }
    # "kvroute-agent listening http=127.0.0.1:PORT grpc=127.0.0.1:PORT"
    line="$(grep '^kvroute-agent listening' "$WORK/agent$i.out")"
    eval "H$i=$(sed 's/.*http=\([^ ]*\).*/\1/' <<<"$line")"
    eval "G$i=$(sed 's/.*grpc=\([^ ]*\).*/\1/' <<<"$line")"
  done
  MODEL="$(curl -sf "http://$H1/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')" || true
  [ -n "$MODEL" ] || { echo "agent1 lists no model" >&2; return 1; }
}

# start_router NAME: sets ROUTER_URL and ROUTER_PID.
start_router() {
  local name="$1" port prom kind=peer tuned=() tree
  port="$(free_port)"; prom="$(free_port)"
  case "$name" in
    *-tuned) tuned=("${PEER_TUNED[@]}") ;;
  esac
  case "$name" in
    kv|kv-slo|kv-fifo|kv-cf2|kv-no-holds|kv-no-keep|kv-score|round-robin|cache-aware|llm-d)
      kind=kvroute
      local policy="$name" extra=()
      # kv-fifo: the kv policy with the admission queue in arrival order (no cache-first window),
      # to show what serving cached prefixes first is worth.
      [ "$name" = kv-fifo ] && { policy=kv; extra=(--cache-first-for 0); }
      # kv-cf2: the kv policy with cached prefixes first for 2 s only (the window before
      # 2026-12-07), keeping finished turns' blocks: kv-no-keep without its other change.
      [ "$name" = kv-cf2 ] && { policy=kv; extra=(--cache-first-for 2s); }
      # kv-no-holds: the kv policy without prefix holds, to show what they are worth.
      [ "$name" = kv-no-holds ] && { policy=kv; extra=(--no-prefix-holds); }
      # kv-no-keep: the kv policy not keeping a finished request's blocks for its conversation's
      # next turn, cached prefixes first for 2 s (the defaults before 2026-12-07).
      [ "$name" = kv-no-keep ] && { policy=kv; extra=(--keep-finished-for 0 --cache-first-for 2s); }
      # kv-slo: the kv policy told the benchmark's SLOs (--slo-ttft, --slo-tpot).
      [ "$name" = kv-slo ] && { policy=kv; extra=(--slo-ttft "${SLO_TTFT}s" --slo-tpot "${SLO_TPOT}s"); }
      # The queue timeout is long so that the kv policy's admission queue never answers 429 here:
      # the other routers have no queue that gives up, and a 429 would not be comparable.
      start router "$GATEWAY_BIN" gateway --auth off --listen "127.0.0.1:$port" --policy "$policy" \
        --agent "http://$H1,grpc://$G1" --agent "http://$H2,grpc://$G2" --queue-timeout 900s --seed 1 \
        --decision-log 1000 ${extra[@]+"${extra[@]}"} ${KVROUTE_BENCH_GATEWAY_FLAGS:-} ;;
    sglang|sglang-tuned)
      [ ${#tuned[@]} = 0 ] || tuned+=(--max-tree-size 10000)
      start router "$BENCH/venv-sglang/bin/python" -m sglang_router.launch_router \
        --host 127.0.0.1 --port "$port" --worker-urls "http://$H1" "http://$H2" --policy cache_aware \
        --prometheus-host 127.0.0.1 --prometheus-port "$prom" --log-level warn \
        --shutdown-grace-period-secs 1 "${tuned[@]}" ;;
    smg|smg-tuned)
      [ ${#tuned[@]} = 0 ] || tuned+=(--max-tree-size 20000)
      start router "$BENCH/venv-smg/bin/smg" launch \
        --host 127.0.0.1 --port "$port" --worker-urls "http://$H1" "http://$H2" --policy cache_aware \
        --prometheus-host 127.0.0.1 --prometheus-port "$prom" --log-level warn \
        --shutdown-grace-period-secs 1 "${tuned[@]}" ;;
    vllm-router|vllm-router-tuned)
      [ ${#tuned[@]} = 0 ] || tuned+=(--max-tree-size 10000)
      start router "$BENCH/venv-vllm-router/bin/vllm-router" \
        --host 127.0.0.1 --port "$port" --worker-urls "http://$H1" "http://$H2" --policy cache_aware \
        --prometheus-host 127.0.0.1 --prometheus-port "$prom" --log-level warning "${tuned[@]}" ;;
    *) die "no start command for router $name" ;;
  esac
  ROUTER_PID=$STARTED_PID
  ROUTER_URL="http://127.0.0.1:$port"
  ROUTER_KIND="$kind"
  # One example command line per router for the summary (ports and paths differ per run).
  grep -q "^$name: " "$WORK/commands.txt" 2>/dev/null \
    || echo "$name: $(ps -o args= -p "$ROUTER_PID" 2>/dev/null | sed "s|$BENCH/|<bench>/|g; s|$WORK/bin/|target/release/|g")" >>"$WORK/commands.txt"
  python3 bench/routers/results.py ready "$kind" "$ROUTER_URL" 2 "$ROUTER_PID" 120 2>>"$WORK/router.err"
}

SEQ=0
run_one() { # ROUND WORKLOAD ROUTER
  local round="$1" w="$2" r="$3" dir rc=0 err="" DECISIONS_ARGS=()
  SEQ=$((SEQ + 1))
  dir="$WORK/runs/r$round-$w-$r"
  mkdir -p "$dir"
  if ! start_agents; then err="agents did not start"
  elif ! start_router "$r"; then err="router did not become ready: $(tail -n 3 "$WORK/router.err" | tr '\n' ' ' | cut -c1-200)"
  else
    python3 bench/routers/workloads.py config "$w" --base-url "$ROUTER_URL" --model "$MODEL" \
      --tokenizer "$TOKENIZER" --report-dir "$dir/report" --requests "$REQUESTS" \
      --concurrency "$CONCURRENCY" --seed "$round" --slo-ttft "$SLO_TTFT" --slo-tpot "$SLO_TPOT" \
      >"$dir/config.yml"
    python3 bench/routers/results.py scrape "http://$H1" "http://$H2" >"$dir/before.json"
    local rcpu0 acpu0 rcpu1 acpu1
    rcpu0="$(python3 bench/routers/results.py cpu "$ROUTER_PID")"
    acpu0="$(python3 bench/routers/results.py cpu "$AGENT1_PID" "$AGENT2_PID")"
    # In the background and waited for, so that Ctrl-C interrupts the wait at once.
    (cd "$dir" && exec setsid env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 timeout 3600 \
      "$BENCH/venv-loadgen/bin/inference-perf" --config_file config.yml) >"$dir/inference-perf.log" 2>&1 &
    local lg=$!
    PIDS+=("$lg")
    wait "$lg" || rc=$?
    rcpu1="$(python3 bench/routers/results.py cpu "$ROUTER_PID")"
    acpu1="$(python3 bench/routers/results.py cpu "$AGENT1_PID" "$AGENT2_PID")"
    CPU_ARGS=(--router_cpu "$(python3 -c "print(round($rcpu1 - $rcpu0, 2))")"
      --agent_cpu "$(python3 -c "print(round($acpu1 - $acpu0, 2))")")
    python3 bench/routers/results.py scrape "http://$H1" "http://$H2" >"$dir/after.json" || true
    # A kvroute gateway's last decisions, every candidate with its cost terms (--decision-log).
    DECISIONS_ARGS=()
    if [ "$ROUTER_KIND" = kvroute ] \
      && curl -sf "$ROUTER_URL/dashboard/decisions" >"$dir/decisions.json"; then
      DECISIONS_ARGS=(--decisions "$dir/decisions.json")
      # And its one-a-second samples of every agent's room (free, reserved, cached), for --keep.
      curl -sf "$ROUTER_URL/dashboard/history" >"$dir/history.json" || true
    fi
    if [ ! -f "$dir/report/summary_lifecycle_metrics.json" ]; then
      err="inference-perf exit $rc, no report: $(grep -m1 -iE 'error|exception' "$dir/inference-perf.log" | cut -c1-200)"
    fi
  fi
  for f in agent1 agent2 router; do [ -f "$WORK/$f.err" ] && cp "$WORK/$f.err" "$dir/$f.err"; done
  stop_all
  local row
  if [ -z "$err" ]; then
    row="$(python3 bench/routers/results.py row --report "$dir/report" --before "$dir/before.json" \
      --after "$dir/after.json" --router "$r" --workload "$w" --round "$round" --seq "$SEQ" \
      "${CPU_ARGS[@]}" ${DECISIONS_ARGS[@]+"${DECISIONS_ARGS[@]}"})"
  else
    echo "  $r: $err (logs: $dir)" >&2
    KEEP=1
    row="$(python3 bench/routers/results.py failed --router "$r" --workload "$w" --round "$round" \
      --seq "$SEQ" --error "$err")"
  fi
  echo "$row" >>"$WORK/rows.jsonl"
  [ -z "$OUT" ] || echo "$row" >>"$OUT"
  python3 - "$row" <<'PY' >&2
import json, sys
r = json.loads(sys.argv[1])
if not r.get("error"):
    f = lambda v, s: "-" if v is None else s.format(v)
    print(f"  [round {r['round']}] {r['workload']:<18} {r['router']:<18} "
          f"{f(r['output_tok_per_s'], '{:.1f}')} tok/s, TTFT p50 {f(r['ttft_p50_s'], '{:.2f}')} s, "
          f"hit {f(r['prefix_hit_rate'], '{:.0%}')}, preemptions {r['preemptions']}, "
          f"{r['completed']} ok / {r['failed']} failed, split {r['agent_requests']}"
          + (f", moved {l['moved']}/{l['with_prefix']} ({l['cold']} cold) by {l['moved_by']}"
             if (l := r.get("locality")) else ""))
PY
}

# --- the runs --------------------------------------------------------------------------------------
cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
if grep -qw avx512f /proc/cpuinfo; then isa=avx512; elif grep -qw avx2 /proc/cpuinfo; then isa=avx2; else isa="no avx2"; fi
commit="$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
git diff --quiet HEAD -- engine node-agent operator proto 2>/dev/null || commit="$commit+uncommitted changes"
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), $cpu, $isa, load average at start $LOAD_START"
echo "# kvroute $commit; $VERSIONS; python $("$PY312" -c 'import platform; print(platform.python_version())')"
echo "# $ROUNDS round(s); workloads: ${WL[*]}; routers: ${ROUTERS_RUN[*]}; requests: $([ "$REQUESTS" = 0 ] && echo "workload default" || echo "$REQUESTS"); KV $KV_MEMORY per agent; SLO TTFT <= ${SLO_TTFT}s, TPOT <= ${SLO_TPOT}s"
META="$(python3 - "$LOAD_START" "$cpu" "$isa" "$commit" "$VERSIONS" "$ROUNDS" "$SLO_TTFT" "$SLO_TPOT" "$KV_MEMORY" "$REQUESTS" <<'PY'
import json, os, subprocess, sys, time
load, cpu, isa, commit, versions, rounds, ttft, tpot, kv, req = sys.argv[1:]
wl = dict(l.split("\t", 1) for l in subprocess.run(
    [sys.executable, "bench/routers/workloads.py", "list"], capture_output=True, text=True,
    check=True).stdout.splitlines())
print(json.dumps({"type": "meta", "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                  "nproc": os.cpu_count(), "cpu": cpu, "isa": isa, "load_start": load,
                  "kvroute": commit, "versions": versions, "rounds": int(rounds),
                  "kv_memory": kv, "requests": int(req), "slo": {"ttft": float(ttft), "tpot": float(tpot)},
                  "workloads": wl}))
PY
)"
echo "$META" >"$WORK/rows.jsonl"
[ -z "$OUT" ] || echo "$META" >>"$OUT"

for round in $(seq 1 "$ROUNDS"); do
  # Alternate the order between rounds, so that drift in the machine's load (other builds, thermal)
  # does not always favour the routers that run first.
  order=("${ROUTERS_RUN[@]}")
  if [ $((round % 2)) = 0 ]; then
    order=(); for ((i = ${#ROUTERS_RUN[@]} - 1; i >= 0; i--)); do order+=("${ROUTERS_RUN[$i]}"); done
  fi
  for w in "${WL[@]}"; do
    for r in "${order[@]}"; do
      run_one "$round" "$w" "$r"
    done
  done
done

python3 bench/routers/results.py table "$WORK/rows.jsonl"
echo
echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg) (at start: $LOAD_START)"
echo "# router command lines (<bench> = \$KVROUTE_CACHE/bench-routers):"; sed 's/^/#   /' "$WORK/commands.txt"
[ -z "$OUT" ] || echo "# rows written to $OUT"
