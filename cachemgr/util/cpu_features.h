// What instruction sets this CPU runs, for libraries that carry kernels built for more than the
// baseline target (cachemgr/compress/vector_kernels.h, tools/engine/matmul_kernels.h) and pick
// one at run time. Header-only; thread-safe.
#pragma once

namespace cachemgr {

// True when the CPU (and the OS, which must save the AVX registers) runs AVX2 and FMA code: the
// instruction sets of the kernels compiled with -mavx2 -mfma. False on other architectures.
inline bool CpuSupportsAvx2Fma() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();  // idempotent; needed if this runs before the runtime's own constructor
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace cachemgr
