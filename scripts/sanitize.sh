#!/usr/bin/env bash
# The sanitizer stage of CI (docs/RELIABILITY.md, "Sanitizers"):
#   scripts/sanitize.sh asan   every unit, service and Python test against binaries built with
#                              AddressSanitizer + UndefinedBehaviorSanitizer, in build-asan/
#   scripts/sanitize.sh tsan   the service tests and the threaded unit tests (CTest label tsan)
#                              under ThreadSanitizer, with Debian's abseil rebuilt instrumented
#                              (scripts/tsan-abseil.sh), in build-tsan/
#   scripts/sanitize.sh        both
# Configures, builds only what the stage runs (no benchmarks) and runs it. A test fails on any
# sanitizer report, and so does the run if any other process (a daemon, a CLI) reported one:
# tests/CMakeLists.txt sets the sanitizer options and collects the reports. Set BUILD_DIR_ASAN
# or BUILD_DIR_TSAN to build elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(asan tsan)
for stage in "${stages[@]}"; do
  case "$stage" in
    asan | tsan) ;;
    *)
      echo "usage: $0 [asan|tsan]..." >&2
      exit 2
      ;;
  esac
done
scripts/install-deps.sh
jobs=$(nproc)

asan() {
  local build_dir=${BUILD_DIR_ASAN:-build-asan}
  local smollm2 python
  smollm2=$(scripts/fetch-smollm2.sh)
  python=$(scripts/test-venv.sh)
  echo "== ASan + UBSan: build ($build_dir)"
  # Debug (-O0): the fastest to compile, and the optimisation level at which mismatched
  # calling conventions (issue 12, finding 11) show.
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug \
    -DCACHEMGR_SANITIZE=address,undefined -DCACHEMGR_BUILD_BENCH=OFF \
    -DCACHEMGR_SMOLLM2_GGUF="$smollm2" -DCACHEMGR_TEST_PYTHON="$python" >/dev/null
  local start=$SECONDS
  cmake --build "$build_dir" -j"$jobs"
  local built=$SECONDS
  echo "== ASan + UBSan: tests (build took $((built - start)) s)"
  # The Python tests run the sanitized cachemgrd and cachemgrctl (the interpreter itself is not
  # instrumented). install_consumer links an uninstrumented program against the instrumented
  # library, which cannot link: it is a packaging test, run by scripts/test.sh.
  # soak_detects_corruption is a timing-dependent self-test of the soak's checker, not of the
  # daemon (tests/CMakeLists.txt); soak_short runs the soak itself here.
  ctest --test-dir "$build_dir" --output-on-failure -j"$jobs" \
    -E '^(install_consumer|soak_detects_corruption)$'
  echo "== ASan + UBSan: passed (tests took $((SECONDS - built)) s)"
}

tsan() {
  local build_dir=${BUILD_DIR_TSAN:-build-tsan}
  local abseil start=$SECONDS
  # The cache lives under $HOME, which the tests' other-uid children (uid 65534) may not be
  # allowed to read: the loader would then skip the RPATH and load Debian's uninstrumented absl,
  # and TSan would report false races in those children. A copy inside the build tree, which
  # they already read their binaries from, is within their reach.
  mkdir -p "$build_dir"
  rm -rf "$build_dir/abseil-tsan"
  cp -a "$(scripts/tsan-abseil.sh)" "$build_dir/abseil-tsan"
  abseil=$(cd "$build_dir/abseil-tsan" && pwd)
  echo "== TSan: build ($build_dir; instrumented abseil in $abseil)"
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCACHEMGR_SANITIZE=thread \
    -DCACHEMGR_TSAN_ABSEIL_DIR="$abseil" -DCACHEMGR_BUILD_BENCH=OFF >/dev/null
  # Only the test binaries of label tsan (they pull in cachemgrd and the tools they run).
  local targets
  targets=$(ctest --test-dir "$build_dir" -N -L tsan | sed -n 's/^ *Test *#[0-9]*: \(.*__.*\)$/\1/p')
  # shellcheck disable=SC2086
  cmake --build "$build_dir" -j"$jobs" --target $targets
  local built=$SECONDS
  echo "== TSan: tests (label tsan; abseil and build took $((built - start)) s)"
  ctest --test-dir "$build_dir" --output-on-failure -j"$jobs" -L tsan
  echo "== TSan: passed (tests took $((SECONDS - built)) s)"
}

for stage in "${stages[@]}"; do
  "$stage"
done
