#!/usr/bin/env bash
# Runs every test: installs dependencies, builds, runs CTest (unit [cpu] and black-box
# [service] tests against the real daemon binary).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j"$(nproc)"
