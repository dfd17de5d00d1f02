#!/usr/bin/env bash
# The main job: starts cachemgrd on the host backend, runs a client that attaches, allocates,
# writes and reads KV through the shared pool, then stops the daemon gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh >/dev/null
BUILD_DIR=${BUILD_DIR:-build}
run_dir=$(mktemp -d /tmp/cachemgr-demo-XXXXXX)
socket="$run_dir/cachemgr.sock"
"$BUILD_DIR/cachemgr/cachemgrd" --socket="$socket" --memory_budget=512M 2>"$run_dir/daemon.log" &
daemon=$!
cleanup() {
  kill -TERM "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  rm -rf "$run_dir"
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done
echo "cachemgrd (pid $daemon) serving on $socket"
"$BUILD_DIR/client/cachemgr_quickstart" --socket "$socket"
kill -TERM "$daemon"
wait "$daemon"
echo "cachemgrd stopped (exit $?); its structured log:"
cat "$run_dir/daemon.log"
