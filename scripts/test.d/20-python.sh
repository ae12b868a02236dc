# A Python virtual environment with the official `openai` client (and `prometheus_client`, whose
# parser checks the agent's /metrics), for the process tests that drive a real agent with them.
# Exports KVROUTE_PYTHON (the venv's python). Idempotent.
KVROUTE_VENV="$KVROUTE_CACHE/venv-openai"
if ! "$KVROUTE_VENV/bin/python" -c "import openai, prometheus_client" >/dev/null 2>&1; then
  echo "creating $KVROUTE_VENV with the openai and prometheus_client packages"
  python3 -m venv "$KVROUTE_VENV"
  "$KVROUTE_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "openai>=1.40,<3" "prometheus_client>=0.20,<1"
fi
export KVROUTE_PYTHON="$KVROUTE_VENV/bin/python"
