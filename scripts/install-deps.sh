#!/usr/bin/env bash
# Installs the Debian packages cachemgr builds with (skips what is already there).
set -euo pipefail
packages=(build-essential cmake ninja-build pkg-config libgrpc++-dev protobuf-compiler-grpc
          libprotobuf-dev protobuf-compiler libabsl-dev catch2 libbenchmark-dev python3-numpy python3-pytest
          libxxhash-dev
          python3-pip python3-venv python3-matplotlib prometheus-cpp-dev
          nlohmann-json3-dev openssl
          clang-14 libclang-rt-14-dev llvm-14)  # the last three: scripts/fuzz.sh (libFuzzer, symbolizer)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
