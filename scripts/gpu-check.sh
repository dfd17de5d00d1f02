#!/usr/bin/env bash
# The GPU checks, for machines that have a GPU, the CUDA toolkit and CMake but no gRPC, Protobuf
# or Abseil (and no network). Two steps:
#
#   scripts/gpu-check.sh bundle [DIR]   on the development machine: builds the GPU test and
#                                       benchmark binaries (-DCACHEMGR_CUDA=ON, Release) and
#                                       copies them with every shared library they load, the
#                                       dynamic loader included, into DIR (default gpu-bundle/)
#   scripts/gpu-check.sh run [DIR]      on the GPU machine: runs the kernel parity tests, the
#                                       two-process CUDA IPC test against the real cachemgrd,
#                                       the kernel benchmarks and the end-to-end Compress
#                                       benchmark; logs, bench.json and compress_e2e.json go to
#                                       $OUT (or DIR/out). Exit status 1 if a test failed.
#
# The binaries run through the bundled loader with the bundled libraries (nothing from the GPU
# machine but the kernel and the NVIDIA driver, which the CUDA runtime loads at run time), so
# the machine's own glibc or libstdc++ do not matter. docs/GPU.md has the procedure and results.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
dir=${2:-gpu-bundle}
tests=(kernels__cuda__kernels_parity_test kernels__cuda__compress_kernels_parity_test
       gpu__cuda_ipc_test)

bundle() {
  scripts/install-deps.sh
  local build=${BUILD_DIR:-build-gpu}
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCACHEMGR_CUDA=ON \
    -DCACHEMGR_BUILD_TESTS=ON -DCACHEMGR_BUILD_BENCH=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" >/dev/null
  cmake --build "$build" -j"$(nproc)" --target cachemgrd cachemgr_bench_gpu \
    cachemgr_bench_gpu_compress "${tests[@]}"
  rm -rf "$dir"
  mkdir -p "$dir/bin" "$dir/lib"
  cp "$build/cachemgr/cachemgrd" "$build/bench/cachemgr_bench_gpu" \
    "$build/bench/cachemgr_bench_gpu_compress" "$dir/bin/"
  for t in "${tests[@]}"; do cp "$build/tests/$t" "$dir/bin/"; done
  strip --strip-unneeded "$dir"/bin/*
  # Every library the binaries load (libcuda is not linked: the runtime finds the driver).
  for b in "$dir"/bin/*; do
    ldd "$b" | awk '/=>/ { print $3 } /ld-linux/ { print $1 }' | grep '^/' || true
  done | sort -u | while read -r lib; do cp -L "$lib" "$dir/lib/"; done
  strip --strip-unneeded "$dir"/lib/*.so* 2>/dev/null || true
  echo "bundle: $dir ($(du -sh "$dir" | cut -f1))"
}

run() {
  local out=${OUT:-$dir/out}
  mkdir -p "$out"
  local here
  here=$(cd "$dir" && pwd)
  local loader
  loader=$(ls "$here"/lib/ld-linux-*.so.* | head -n 1)
  # Binaries run through the bundled loader; cachemgrd gets a wrapper the IPC test can exec.
  local wrapper="$here/bin/cachemgrd.sh"
  printf '#!/bin/sh\nexec "%s" --library-path "%s" "%s" "$@"\n' "$loader" "$here/lib" \
    "$here/bin/cachemgrd" >"$wrapper"
  chmod +x "$wrapper"
  command -v nvidia-smi >/dev/null && nvidia-smi -L | tee "$out/devices.txt" || true
  local failed=0
  for t in "${tests[@]}"; do
    echo "== $t"
    if CACHEMGRD="$wrapper" "$loader" --library-path "$here/lib" "$here/bin/$t" \
      --reporter compact >"$out/$t.log" 2>&1; then
      tail -n 3 "$out/$t.log"
    else
      failed=1
      tail -n 40 "$out/$t.log"
    fi
  done
  echo "== cachemgr_bench_gpu"
  "$loader" --library-path "$here/lib" "$here/bin/cachemgr_bench_gpu" --json="$out/bench.json" \
    | tee "$out/bench.md"
  echo "== cachemgr_bench_gpu_compress"
  CACHEMGRD="$wrapper" "$loader" --library-path "$here/lib" \
    "$here/bin/cachemgr_bench_gpu_compress" --json="$out/compress_e2e.json" \
    | tee "$out/compress_e2e.md" || failed=1
  return $failed
}

case "$mode" in
  bundle) bundle ;;
  run) run ;;
  *)
    echo "usage: scripts/gpu-check.sh bundle|run [DIR]" >&2
    exit 2
    ;;
esac
