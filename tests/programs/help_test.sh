#!/usr/bin/env bash
# Every program of the build answers --help with its usage on stdout and exit 0, without a daemon,
# a model or a device.
#
#   tests/programs/help_test.sh PROGRAM...
set -uo pipefail
out=$(mktemp)
trap 'rm -f "$out"' EXIT
passed=0
failed=0
for program in "$@"; do
  name=$(basename "$program")
  timeout 60 "$program" --help >"$out" 2>/dev/null
  code=$?
  if [ "$code" -ne 0 ]; then
    echo "FAIL $name --help: exit $code"
    failed=$((failed + 1))
  elif ! grep -q -- '--' "$out"; then
    echo "FAIL $name --help: no usage (no --flag) on stdout"
    failed=$((failed + 1))
  else
    echo "ok   $name --help: $(head -n 1 "$out")"
    passed=$((passed + 1))
  fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
