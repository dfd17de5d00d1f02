#!/usr/bin/env bash
# Creates (or reuses) the test virtualenv at .venv with what the Python tests need beyond
# Debian's packages, installs the Python client from client/python into it (pip install, as a
# user would), and prints its python.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CACHEMGR_TEST_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -r tests/python/requirements.txt >&2
"${pip[@]}" --force-reinstall --no-deps ./client/python >&2
"${pip[@]}" ./client/python >&2  # its dependencies
echo "$(cd "$venv" && pwd)/bin/python"
