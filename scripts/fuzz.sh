#!/usr/bin/env bash
# Builds and runs the libFuzzer targets (fuzz/; docs/RELIABILITY.md, "Fuzzing").
#
#   scripts/fuzz.sh smoke [TARGET...]   every target (or those named) for FUZZ_SECONDS (10) each,
#                                        FUZZ_PARALLEL (nproc) at a time, from fuzz/corpus/TARGET;
#                                        fails on any crash, leak, UB, timeout or OOM. CI runs it.
#   scripts/fuzz.sh long [TARGET...]    FUZZ_SECONDS (600) per target with FUZZ_JOBS (nproc)
#                                        parallel jobs, then merges what found new coverage back
#                                        into fuzz/corpus/TARGET and reports executions and
#                                        coverage (commit the corpus growth if you want it kept).
#   scripts/fuzz.sh coverage [TARGET...]  cov/ft of the committed corpus and the edges covered in
#                                        each target's own source files.
#   scripts/fuzz.sh seeds                rewrites the generated seeds in fuzz/corpus/.
#   scripts/fuzz.sh list                 the target names.
#
# A crash leaves its input in build-fuzz/artifacts/TARGET/; reproduce it with
#   build-fuzz/fuzz/fuzz_TARGET build-fuzz/artifacts/TARGET/crash-...
# then fix it, add a test under tests/ and copy the input into fuzz/corpus/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=${FUZZ_BUILD_DIR:-build-fuzz}
ALL_TARGETS=(config npy gguf llama2c_checkpoint llama2c_tokenizer coded_layer_image
             rpc_attach rpc_heartbeat rpc_detach rpc_allocate rpc_free rpc_fork rpc_step
             rpc_get_sequence rpc_list_sequences rpc_stats rpc_compress rpc_finish_compress
             rpc_fetch rpc_park rpc_watch rpc_store_prefix rpc_match_prefix rpc_load_prefix
             service_program fast_path)

# The source files each target is about (for the coverage report).
focus_files() {
  case "$1" in
    config) echo "cachemgr/config.cc" ;;
    npy) echo "cachemgr/util/npy.cc" ;;
    gguf) echo "tools/engine/gguf_file.cc tools/engine/quant.cc tools/engine/checkpoint.cc" \
               "tools/engine/tokenizer.cc tools/engine/sentencepiece_tokenizer.cc" \
               "tools/engine/bpe_tokenizer.cc" ;;
    llama2c_checkpoint) echo "tools/engine/checkpoint.cc" ;;
    llama2c_tokenizer) echo "tools/engine/sentencepiece_tokenizer.cc tools/engine/tokenizer.cc" ;;
    coded_layer_image) echo "cachemgr/service/coded_layer_wire.cc cachemgr/compress/coded_layer.cc" ;;
    fast_path) echo "cachemgr/service/fast_path_server.cc cachemgr/util/fast_path_wire.cc" \
                    "cachemgr/service/session_calls.cc" ;;
    *) echo "cachemgr/service/cachemgr_service.cc cachemgr/service/proto_convert.cc" \
            "cachemgr/cache_manager.cc cachemgr/cache_manager_compress.cc" \
            "cachemgr/cache_manager_prefix.cc cachemgr/prefix_store.cc" ;;
  esac
}

# Flags of one target: programs of many steps and requests with nested messages need longer
# inputs than libFuzzer's default (the longest seed).
target_flags() {
  case "$1" in
    service_program|fast_path) echo "-max_len=2048" ;;
    rpc_*) echo "-max_len=512" ;;
  esac
}

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

mode=${1:-}
[ -n "$mode" ] || usage
shift
if [ "$mode" = list ]; then
  printf '%s\n' "${ALL_TARGETS[@]}"
  exit 0
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
for t in "${targets[@]}"; do
  printf '%s\n' "${ALL_TARGETS[@]}" | grep -qx "$t" || { echo "unknown target: $t" >&2; exit 2; }
done

configure_and_build() {
  local launcher=()
  if command -v ccache >/dev/null; then
    launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
  fi
  # -O1 -g without NDEBUG: fast enough to fuzz, asserts on, readable stacks.
  CC=${CC:-clang-14} CXX=${CXX:-clang++-14} cmake -S . -B "$BUILD_DIR" -G Ninja \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
    -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" -DCACHEMGR_BUILD_FUZZERS=ON \
    -DCACHEMGR_BUILD_TESTS=OFF -DCACHEMGR_BUILD_BENCH=OFF "${launcher[@]}" >/dev/null
  local build_targets=("$@")
  cmake --build "$BUILD_DIR" -j"$(nproc)" --target "${build_targets[@]}"
}

fuzzer() { echo "$BUILD_DIR/fuzz/fuzz_$1"; }

# Symbolized stacks; UB and leaks are fatal (the build already makes UB abort).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
if [ -z "${ASAN_SYMBOLIZER_PATH:-}" ] && command -v llvm-symbolizer-14 >/dev/null; then
  export ASAN_SYMBOLIZER_PATH=$(command -v llvm-symbolizer-14)
fi
# Per-input limits: a hang or a runaway allocation is a finding too.
# -malloc_limit_mb: no input of a few KB has a reason to ask for a GB at once.
COMMON_FLAGS=(-timeout=60 -rss_limit_mb=2560 -malloc_limit_mb=1024 -print_final_stats=1)

# "execs cov ft" from a libFuzzer log.
summarize_log() {
  local execs cov ft
  execs=$(grep -h '^stat::number_of_executed_units' "$@" | awk '{s += $2} END {print s + 0}')
  cov=$(grep -ho 'cov: [0-9]*' "$@" | awk '{print $2}' | sort -n | tail -1)
  ft=$(grep -ho 'ft: [0-9]*' "$@" | awk '{print $2}' | sort -n | tail -1)
  echo "${execs:-0} ${cov:-0} ${ft:-0}"
}

run_smoke() {
  local seconds=${FUZZ_SECONDS:-10} parallel=${FUZZ_PARALLEL:-$(nproc)}
  local logs="$BUILD_DIR/smoke-logs"
  rm -rf "$logs" "$BUILD_DIR/smoke-corpus"
  mkdir -p "$logs"
  export BUILD_DIR seconds logs
  export COMMON_FLAGS_STR="${COMMON_FLAGS[*]}"
  export -f target_flags
  echo "== fuzz smoke: ${#targets[@]} targets, ${seconds}s each, $parallel at a time"
  # Each target: its committed corpus (read) plus a scratch corpus (new units go there).
  printf '%s\n' "${targets[@]}" | xargs -P "$parallel" -I{} bash -c '
    t={}
    mkdir -p "$BUILD_DIR/smoke-corpus/$t" "$BUILD_DIR/artifacts/$t"
    if "$BUILD_DIR/fuzz/fuzz_$t" $COMMON_FLAGS_STR $(target_flags "$t") \
        -max_total_time="$seconds" \
        -artifact_prefix="$BUILD_DIR/artifacts/$t/" \
        "$BUILD_DIR/smoke-corpus/$t" "fuzz/corpus/$t" >"$logs/$t.log" 2>&1; then
      echo ok >"$logs/$t.status"
    else
      echo failed >"$logs/$t.status"
    fi'
  local failed=0
  printf '%-22s %10s %8s %8s  %s\n' target execs cov ft result
  for t in "${targets[@]}"; do
    read -r execs cov ft < <(summarize_log "$logs/$t.log")
    local status
    status=$(cat "$logs/$t.status" 2>/dev/null || echo failed)
    printf '%-22s %10s %8s %8s  %s\n' "$t" "$execs" "$cov" "$ft" "$status"
    [ "$status" = ok ] || failed=1
  done
  if [ $failed -ne 0 ]; then
    for t in "${targets[@]}"; do
      [ "$(cat "$logs/$t.status" 2>/dev/null)" = ok ] && continue
      echo "== $t failed; log tail ($logs/$t.log):"
      tail -n 60 "$logs/$t.log"
      ls "$BUILD_DIR/artifacts/$t/" 2>/dev/null | sed "s|^|   input: $BUILD_DIR/artifacts/$t/|"
    done
    return 1
  fi
}

run_long() {
  local seconds=${FUZZ_SECONDS:-600} jobs=${FUZZ_JOBS:-$(nproc)}
  for t in "${targets[@]}"; do
    local work="$BUILD_DIR/long/$t"
    mkdir -p "$work/corpus" "$BUILD_DIR/artifacts/$t"
    rm -f "$work"/fuzz-*.log
    echo "== $t: ${seconds}s, $jobs jobs (logs in $work)"
    # shellcheck disable=SC2046  # the target's flags are words
    local build root
    build=$(realpath "$BUILD_DIR")
    root=$(pwd)
    (cd "$work" && "$build/fuzz/fuzz_$t" "${COMMON_FLAGS[@]}" $(target_flags "$t") \
       -max_total_time="$seconds" \
       -jobs="$jobs" -workers="$jobs" -artifact_prefix="$build/artifacts/$t/" \
       corpus "$root/fuzz/corpus/$t" >/dev/null 2>&1) || true
    read -r execs cov ft < <(summarize_log "$work"/fuzz-*.log)
    local crashes
    crashes=$(ls "$BUILD_DIR/artifacts/$t" 2>/dev/null | wc -l)
    # Back into the committed corpus: only inputs that add coverage.
    "$(fuzzer "$t")" -merge=1 "fuzz/corpus/$t" "$work/corpus" >"$work/merge.log" 2>&1
    read -r _ corpus_cov corpus_ft < <(corpus_coverage "$t")
    printf '%-22s execs %s (max cov %s ft %s in a job); corpus now %s files, cov %s ft %s;' \
      "$t" "$execs" "$cov" "$ft" "$(ls "fuzz/corpus/$t" | wc -l)" "$corpus_cov" "$corpus_ft"
    printf ' artifacts %s\n' "$crashes"
  done
}

# "files cov ft" of the committed corpus (one pass over it, no mutation).
corpus_coverage() {
  local log
  log=$("$(fuzzer "$1")" -runs=0 "fuzz/corpus/$1" 2>&1 | grep 'INITED\|DONE' | tail -1)
  echo "$(ls "fuzz/corpus/$1" | wc -l) $(echo "$log" | grep -o 'cov: [0-9]*' | awk '{print $2}')" \
    "$(echo "$log" | grep -o 'ft: [0-9]*' | awk '{print $2}')"
}

run_coverage() {
  printf '%-22s %6s %8s %8s  %s\n' target files cov ft "edges covered in its own sources"
  for t in "${targets[@]}"; do
    read -r files cov ft < <(corpus_coverage "$t")
    # -print_coverage lists every instrumented function with "edges: covered/total" and its
    # file; sum those of the target's own sources.
    local report
    report=$("$(fuzzer "$t")" -runs=0 -print_coverage=1 "fuzz/corpus/$t" 2>&1 || true)
    local per_file=""
    for f in $(focus_files "$t"); do
      local edges
      edges=$(echo "$report" | grep -E '^(UN)?COVERED_FUNC' | grep -F "$f:" |
              grep -o 'edges: [0-9]*/[0-9]*' | awk -F'[ /]' '{c += $2; n += $3}
                END {if (n) printf "%d/%d (%d%%)", c, n, 100 * c / n; else print "-"}')
      per_file+="$(basename "$f") $edges; "
    done
    printf '%-22s %6s %8s %8s  %s\n' "$t" "$files" "$cov" "$ft" "$per_file"
  done
}

build_targets=()
for t in "${targets[@]}"; do build_targets+=("fuzz_$t"); done
case "$mode" in
  smoke)
    configure_and_build "${build_targets[@]}"
    run_smoke
    ;;
  long)
    configure_and_build "${build_targets[@]}"
    run_long
    ;;
  coverage)
    configure_and_build "${build_targets[@]}"
    run_coverage
    ;;
  seeds)
    configure_and_build fuzz_seed_corpus
    "$BUILD_DIR/fuzz/fuzz_seed_corpus" fuzz/corpus
    ;;
  *)
    usage
    ;;
esac
