#!/usr/bin/env bash
# Obtains llama.cpp from the PyPI source distribution of llama-cpp-python (which vendors
# llama.cpp under vendor/llama.cpp) and builds the two peer tools the benchmarks compare against:
# llama-batched-bench (engine speed, issue 4) and llama-server (HTTP serving, issue 5).
#
# Everything lands under ${KVROUTE_CACHE:-$HOME/.cache/kvroute}/llama.cpp-<version>/; nothing of
# llama.cpp is ever written into the repository. Idempotent: when both binaries are already built
# from the pinned version it only prints where they are.
#
# Use:  bench/llamacpp.sh            build (if needed) and print the bin directory
#       . bench/llamacpp.sh; llamacpp_ensure   from another script; then use
#       "$LLAMACPP_BIN/llama-batched-bench" and "$LLAMACPP_BIN/llama-server".
# Env:  KVROUTE_LLAMACPP_VERSION  llama-cpp-python version to pin (default below)
#       KVROUTE_LLAMACPP_JOBS     parallel compile jobs (default: nproc)

# Pinned so that figures from different days compare the same peer. 0.3.36 vendors a 2025/2026
# llama.cpp with llama-batched-bench's `-o jsonl` output.
LLAMACPP_PY_VERSION="${KVROUTE_LLAMACPP_VERSION:-0.3.36}"
LLAMACPP_CACHE="${KVROUTE_CACHE:-$HOME/.cache/kvroute}"
LLAMACPP_DIR="$LLAMACPP_CACHE/llama.cpp-$LLAMACPP_PY_VERSION"
LLAMACPP_SRC="$LLAMACPP_DIR/src/llama_cpp_python-$LLAMACPP_PY_VERSION/vendor/llama.cpp"
LLAMACPP_BUILD="$LLAMACPP_DIR/build"
LLAMACPP_BIN="$LLAMACPP_BUILD/bin"
LLAMACPP_TARGETS=(llama-batched-bench llama-server)

llamacpp_log() { echo "[llamacpp] $*" >&2; }

llamacpp_built() {
  local t
  for t in "${LLAMACPP_TARGETS[@]}"; do
    [ -x "$LLAMACPP_BIN/$t" ] || return 1
  done
  [ -f "$LLAMACPP_BUILD/.kvroute-built" ]
}

llamacpp_pip() {
  local c
  for c in "python3 -m pip" "python -m pip" "pip3" "pip"; do
    if $c --version >/dev/null 2>&1; then
      echo "$c"
      return 0
    fi
  done
  llamacpp_log "error: no pip found (tried python3 -m pip, python -m pip, pip3, pip)"
  return 1
}

llamacpp_fetch_source() {
  [ -f "$LLAMACPP_SRC/CMakeLists.txt" ] && return 0
  local pip sdist tmp
  pip="$(llamacpp_pip)" || return 1
  mkdir -p "$LLAMACPP_DIR/download"
  sdist="$(find "$LLAMACPP_DIR/download" -maxdepth 1 -name "llama_cpp_python-$LLAMACPP_PY_VERSION.tar.gz" | head -n1)"
  if [ -z "$sdist" ]; then
    llamacpp_log "downloading the llama-cpp-python==$LLAMACPP_PY_VERSION source distribution"
    # --no-binary for llama-cpp-python only: we want its sdist (it carries llama.cpp's sources),
    # never a wheel. Not `:all:`: that would also force pip to compile the sdist's build
    # requirements (ninja, cmake) from source just to read its metadata.
    $pip download --no-deps --no-binary llama-cpp-python --disable-pip-version-check \
      "llama-cpp-python==$LLAMACPP_PY_VERSION" -d "$LLAMACPP_DIR/download" >&2 || return 1
    sdist="$(find "$LLAMACPP_DIR/download" -maxdepth 1 -name 'llama_cpp_python-*.tar.gz' | head -n1)"
  fi
  if [ -z "$sdist" ]; then
    llamacpp_log "error: pip download left no llama_cpp_python-*.tar.gz in $LLAMACPP_DIR/download"
    return 1
  fi
  llamacpp_log "unpacking vendor/llama.cpp from $(basename "$sdist")"
  tmp="$(mktemp -d "$LLAMACPP_DIR/unpack-XXXXXX")"
  # Only the vendored llama.cpp tree is needed (the Python bindings are not).
  if ! tar -xzf "$sdist" -C "$tmp" --wildcards "llama_cpp_python-$LLAMACPP_PY_VERSION/vendor/llama.cpp/*"; then
    rm -rf "$tmp"
    return 1
  fi
  mkdir -p "$LLAMACPP_DIR/src"
  rm -rf "$LLAMACPP_DIR/src/llama_cpp_python-$LLAMACPP_PY_VERSION"
  mv "$tmp/llama_cpp_python-$LLAMACPP_PY_VERSION" "$LLAMACPP_DIR/src/"
  rm -rf "$tmp"
  [ -f "$LLAMACPP_SRC/CMakeLists.txt" ] || { llamacpp_log "error: no CMakeLists.txt in $LLAMACPP_SRC"; return 1; }
}

llamacpp_need_cmake() {
  command -v cmake >/dev/null 2>&1 && return 0
  llamacpp_log "cmake not found; installing it with apt-get"
  if command -v apt-get >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get install -y cmake >&2 || { $sudo apt-get update >&2 && $sudo apt-get install -y cmake >&2; } || return 1
  else
    llamacpp_log "error: cmake is missing and apt-get is not available; install cmake"
    return 1
  fi
}

llamacpp_ensure() {
  if llamacpp_built; then
    return 0
  fi
  mkdir -p "$LLAMACPP_DIR"
  # One builder at a time (several scripts may call this at once).
  local lock="$LLAMACPP_DIR/.lock"
  exec 9>"$lock"
  if command -v flock >/dev/null 2>&1; then
    flock 9
  fi
  if llamacpp_built; then
    exec 9>&-
    return 0
  fi
  llamacpp_fetch_source || { exec 9>&-; return 1; }
  llamacpp_need_cmake || { exec 9>&-; return 1; }
  local jobs="${KVROUTE_LLAMACPP_JOBS:-$(nproc 2>/dev/null || echo 2)}"
  llamacpp_log "configuring llama.cpp (vendored by llama-cpp-python $LLAMACPP_PY_VERSION) in $LLAMACPP_BUILD"
  # Static libraries: the two binaries stay self-contained. Native: the peer gets every SIMD
  # extension this CPU has, as kvroute does by runtime detection. No web UI: the server's build
  # would otherwise try to download prebuilt UI assets (and the UI plays no part in a benchmark).
  if ! cmake -S "$LLAMACPP_SRC" -B "$LLAMACPP_BUILD" \
      -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON \
      -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2; then
    exec 9>&-
    return 1
  fi
  llamacpp_log "building ${LLAMACPP_TARGETS[*]} with $jobs jobs (this takes a while)"
  if ! cmake --build "$LLAMACPP_BUILD" --config Release -j "$jobs" --target "${LLAMACPP_TARGETS[@]}" >&2; then
    exec 9>&-
    return 1
  fi
  local t
  for t in "${LLAMACPP_TARGETS[@]}"; do
    if [ ! -x "$LLAMACPP_BIN/$t" ]; then
      llamacpp_log "error: the build finished but $LLAMACPP_BIN/$t is missing"
      exec 9>&-
      return 1
    fi
  done
  echo "llama-cpp-python $LLAMACPP_PY_VERSION" >"$LLAMACPP_BUILD/.kvroute-built"
  exec 9>&-
  llamacpp_log "built: $LLAMACPP_BIN"
}

# The default model, found the way scripts/test.d/10-model.sh and the engine find it; fetched
# through that script when absent. Sets KVROUTE_MODEL_PATH.
kvroute_bench_model() {
  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  export KVROUTE_CACHE="${KVROUTE_CACHE:-$HOME/.cache/kvroute}"
  KVROUTE_MODEL_PATH="${KVROUTE_MODEL_PATH:-$KVROUTE_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
  if [ ! -f "$KVROUTE_MODEL_PATH" ]; then
    # shellcheck source=scripts/test.d/10-model.sh
    . "$repo/scripts/test.d/10-model.sh" || return 1
  fi
  export KVROUTE_MODEL_PATH
}

# Exits with a message naming the flag unless VALUE is a positive integer.
bench_need_count() { # FLAG VALUE
  case "$2" in
    ''|*[!0-9]*|0) echo "error: $1 must be a positive integer, got '$2'" >&2; exit 2 ;;
  esac
}

# kvroute-agent for the comparisons: ${KVROUTE_AGENT_BIN:-target/release/kvroute-agent} (relative
# to the repository root), built with cargo when missing. Sets KVROUTE_AGENT; returns 1 (with a
# message) when there is none, so callers can go on with llama.cpp alone.
kvroute_bench_agent() {
  local repo bin
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  bin="${KVROUTE_AGENT_BIN:-target/release/kvroute-agent}"
  case "$bin" in /*) ;; *) bin="$repo/$bin" ;; esac
  if [ ! -x "$bin" ] && [ -z "${KVROUTE_AGENT_BIN:-}" ]; then
    if command -v cargo >/dev/null 2>&1; then
      echo "[bench] $bin missing: cargo build --release -p kvroute-agent" >&2
      (cd "$repo" && cargo build --release -p kvroute-agent >&2) || true
    fi
  fi
  if [ ! -x "$bin" ]; then
    echo "[bench] no kvroute-agent binary at $bin" >&2
    return 1
  fi
  export KVROUTE_AGENT="$bin"
}

# Python with the official `openai` client, in a venv at $KVROUTE_CACHE/venv (created with pip when
# missing). Sets BENCH_PYTHON.
bench_venv() {
  local venv="${KVROUTE_CACHE:-$HOME/.cache/kvroute}/venv"
  if [ ! -x "$venv/bin/python" ]; then
    echo "[bench] creating $venv" >&2
    python3 -m venv "$venv" >&2 || return 1
  fi
  if ! "$venv/bin/python" -c 'import openai' >/dev/null 2>&1; then
    echo "[bench] installing the openai client into $venv" >&2
    "$venv/bin/python" -m pip install --disable-pip-version-check -q 'openai>=1.40,<3' >&2 || return 1
  fi
  export BENCH_PYTHON="$venv/bin/python"
}

# Machine facts for the record, as "key: value" lines (read by bench/summarize.py).
bench_machine_info() {
  local cpu flags f have=""
  cpu="$(grep -m1 -E '^(model name|Model|Hardware)' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')"
  [ -z "$cpu" ] && cpu="$(uname -m)"
  flags="$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2-)"
  for f in avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni asimd asimddp sve; do
    case " $flags " in *" $f "*) have="$have $f" ;; esac
  done
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "cpu: $cpu"
  echo "cpus online: $(getconf _NPROCESSORS_ONLN 2>/dev/null || echo ?), usable by this process (nproc): $(nproc 2>/dev/null || echo ?)"
  echo "simd:${have:- none of the listed}"
  echo "memory: $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo 2>/dev/null)"
  echo "kernel: $(uname -sr)"
  echo "load average at start (1/5/15 min): $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  llamacpp_ensure
  echo "$LLAMACPP_BIN"
fi
