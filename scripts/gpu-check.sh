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
#                                       the NCCL transfers (one GPU, and two when present),
#                                       the KV mem-pool allocator under the machine's PyTorch
#                                       (tests/gpu/kv_mem_pool_check.py), the kernel benchmarks
#                                       and the end-to-end Compress benchmark; logs, bench.json,
#                                       kv_mem_pool.json and compress_e2e.json go to $OUT (or
#                                       DIR/out). Exit status 1 if a test failed.
#
# The binaries run through the bundled loader with the bundled libraries (nothing from the GPU
# machine but the kernel and the NVIDIA driver, which the CUDA runtime loads at run time), so
# the machine's own glibc or libstdc++ do not matter. The KV mem-pool allocator is the exception:
# PyTorch loads it into the machine's python3, so it uses the machine's libstdc++; when the
# bundled build does not load there, run builds it again from the bundled sources with the
# machine's c++ (and says so). docs/GPU.md has the procedure and results.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
dir=${2:-gpu-bundle}
tests=(kernels__cuda__kernels_parity_test kernels__cuda__compress_kernels_parity_test
       gpu__cuda_ipc_test gpu__nccl_comm_test gpu__nccl_transfer_test)

bundle() {
  scripts/install-deps.sh
  local build=${BUILD_DIR:-build-gpu}
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCACHEMGR_CUDA=ON \
    -DCACHEMGR_BUILD_TESTS=ON -DCACHEMGR_BUILD_BENCH=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" >/dev/null
  cmake --build "$build" -j"$(nproc)" --target cachemgrd cachemgr_bench_gpu \
    cachemgr_bench_gpu_compress cachemgr_kv_mem_pool "${tests[@]}"
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
  # The KV mem-pool check: the allocator library, its Python wrapper and the check script (run
  # by the machine's python3, outside the bundled loader), and the library's sources.
  mkdir -p "$dir/python/src/client/kv_mem_pool"
  cp "$build/client/kv_mem_pool/libcachemgr_kv_mem_pool.so" tests/gpu/kv_mem_pool_check.py \
    client/python/cachemgr/kv_mem_pool.py "$dir/python/"
  strip --strip-unneeded "$dir/python/libcachemgr_kv_mem_pool.so"
  cp client/kv_mem_pool/*.h client/kv_mem_pool/*.cc client/kv_mem_pool/kv_mem_pool.map \
    "$dir/python/src/client/kv_mem_pool/"
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
  echo "== kv_mem_pool_check"
  kv_mem_pool_check "$here" "$out" || failed=1
  echo "== cachemgr_bench_gpu"
  "$loader" --library-path "$here/lib" "$here/bin/cachemgr_bench_gpu" --json="$out/bench.json" \
    | tee "$out/bench.md"
  echo "== cachemgr_bench_gpu_compress"
  CACHEMGRD="$wrapper" "$loader" --library-path "$here/lib" \
    "$here/bin/cachemgr_bench_gpu_compress" --json="$out/compress_e2e.json" \
    | tee "$out/compress_e2e.md" || failed=1
  return $failed
}

# The KV mem-pool allocator under the machine's python3 and PyTorch (skipped, and said so, where
# there is no python3, torch or GPU). Result in $out/kv_mem_pool.json, log in
# $out/kv_mem_pool_check.log.
kv_mem_pool_check() {
  local here=$1 out=$2
  local lib="$here/python/libcachemgr_kv_mem_pool.so"
  if ! command -v python3 >/dev/null; then
    echo "kv_mem_pool_check: skipped (no python3 on this machine)" |
      tee "$out/kv_mem_pool_check.log"
    echo '{"status": "skipped", "reason": "no python3 on this machine"}' >"$out/kv_mem_pool.json"
    return 0
  fi
  if ! python3 -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1])' "$lib" \
    >"$out/kv_mem_pool_check.log" 2>&1; then
    local src="$here/python/src" built
    built=$(mktemp -d)/libcachemgr_kv_mem_pool.so
    echo "the bundled library does not load here (above); building it with this machine's c++" \
      >>"$out/kv_mem_pool_check.log"
    if ! c++ -std=c++17 -O2 -fPIC -shared -fvisibility=hidden -I"$src" \
      -Wl,--version-script="$src/client/kv_mem_pool/kv_mem_pool.map" \
      "$src/client/kv_mem_pool/kv_mem_pool.cc" "$src/client/kv_mem_pool/region_allocator.cc" \
      -o "$built" -pthread >>"$out/kv_mem_pool_check.log" 2>&1; then
      tail -n 20 "$out/kv_mem_pool_check.log"
      return 1
    fi
    lib=$built
  fi
  if python3 "$here/python/kv_mem_pool_check.py" --library "$lib" \
    --wrapper "$here/python/kv_mem_pool.py" --out "$out" >>"$out/kv_mem_pool_check.log" 2>&1; then
    tail -n 12 "$out/kv_mem_pool_check.log"
  else
    tail -n 40 "$out/kv_mem_pool_check.log"
    return 1
  fi
}

case "$mode" in
  bundle) bundle ;;
  run) run ;;
  *)
    echo "usage: scripts/gpu-check.sh bundle|run [DIR]" >&2
    exit 2
    ;;
esac
