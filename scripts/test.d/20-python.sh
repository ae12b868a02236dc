# A Python virtual environment with the official `openai` client, for the process tests that
# drive a real agent with it. Exports KVROUTE_PYTHON (the venv's python). Idempotent.
KVROUTE_VENV="$KVROUTE_CACHE/venv-openai"
if ! "$KVROUTE_VENV/bin/python" -c "import openai" >/dev/null 2>&1; then
  echo "creating $KVROUTE_VENV with the openai package"
  python3 -m venv "$KVROUTE_VENV"
  "$KVROUTE_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "openai>=1.40,<3"
fi
export KVROUTE_PYTHON="$KVROUTE_VENV/bin/python"
