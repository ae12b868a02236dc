# Headless Chromium for the gateway dashboard test (operator/tests/gateway_dashboard.rs).
# Installs the Debian package `chromium` only when no chromium is on PATH; exports
# KVROUTE_CHROMIUM. Sourced by scripts/test.sh (set -euo pipefail). Idempotent.
if [ -z "${KVROUTE_CHROMIUM:-}" ]; then
  if ! command -v chromium >/dev/null 2>&1; then
    echo "installing chromium (Debian package) for the dashboard test"
    # A fresh machine may have no package lists yet: update them first.
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null
    else
      sudo apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive sudo apt-get install -y chromium >/dev/null
    fi
  fi
  KVROUTE_CHROMIUM="$(command -v chromium)"
fi
export KVROUTE_CHROMIUM
