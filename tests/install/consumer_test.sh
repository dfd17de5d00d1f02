#!/usr/bin/env bash
# Installs the build tree into a temporary prefix, then configures, builds and runs a separate
# CMake project that finds it with find_package(cachemgr) and links cachemgr::client.
set -euo pipefail
build_dir=$1
source_dir=$(cd "$(dirname "$0")" && pwd)/consumer
work=$(mktemp -d /tmp/cachemgr-install-XXXXXX)
trap 'rm -rf "$work"' EXIT
cmake --install "$build_dir" --prefix "$work/prefix" >/dev/null
cmake -S "$source_dir" -B "$work/build" -G Ninja -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/build" >/dev/null
"$work/build/consumer"
test -x "$work/prefix/bin/cachemgrd"
test -f "$work/prefix/share/cachemgr/deploy/cachemgrd.service"
echo "install + find_package(cachemgr) OK"
