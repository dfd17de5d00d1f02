#!/usr/bin/env bash
# Creates (or reuses) the test virtualenv at .venv with what the Python tests need beyond
# Debian's packages, and prints its python.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CACHEMGR_TEST_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt >&2
echo "$(cd "$venv" && pwd)/bin/python"
