#!/usr/bin/env bash
# Usage: sanitizer_reports.sh reset|check DIR
# The sanitizer builds (CACHEMGR_SANITIZE) point every test's sanitizer output at DIR (the
# runtime's log_path: DIR/<test>.<pid>), so a report fails the run whichever process wrote it --
# the test binary, a cachemgrd it started, or a CLI a Python test ran -- and however that
# process ended (a daemon killed by the test's teardown included). `reset` empties DIR (CTest
# runs it before the tests), `check` prints every report and fails if there is one (after them).
set -euo pipefail
mode=$1
dir=$2
case "$mode" in
  reset)
    rm -rf "$dir"
    mkdir -p "$dir"
    # Tests run some processes as another uid (SpawnAs): they must be able to report too.
    chmod 1777 "$dir"
    ;;
  check)
    shopt -s nullglob
    reports=("$dir"/*)
    if [ ${#reports[@]} -eq 0 ]; then
      echo "no sanitizer reports in $dir"
      exit 0
    fi
    for report in "${reports[@]}"; do
      echo "==== $report"
      cat "$report"
    done
    echo "${#reports[@]} sanitizer report(s) in $dir" >&2
    exit 1
    ;;
  *)
    echo "usage: $0 reset|check DIR" >&2
    exit 2
    ;;
esac
