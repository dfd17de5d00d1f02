// The engine's dot-product loops, built once per instruction set and picked at run time
// (internal to cachemgr_engine; ops.cc calls them). The same scheme as the compression kernels
// (cachemgr/compress/vector_kernels.h): matmul_kernels.cc is compiled for the baseline target
// and, on x86-64, with -mavx2 -mfma; only these tables of plain-pointer functions cross between
// the builds. Unlike the compression kernels, the engine lets the compiler fuse multiply-adds
// (-ffp-contract=fast), so the AVX2 + FMA build rounds differently from the baseline (within
// float tolerance).
#pragma once

#include <cstddef>

namespace cachemgr::engine {

struct MatMulKernels {
  // Instruction set, for logs and tests: "baseline" or "avx2_fma".
  const char* name;

  // sum_i a[i] * b[i], i < n.
  float (*dot)(const float* a, const float* b, size_t n);

  // y[t][o] = x[t] . w[o] for t < rows, o0 <= o < o1; x [rows, in], w [out, in] (rows o0..o1
  // read), y [rows, out].
  void (*matmul_rows)(const float* x, size_t rows, size_t in, const float* w, size_t o0, size_t o1,
                      size_t out, float* y);
};

// The baseline build (every target).
const MatMulKernels& BaselineMatMulKernels();

// The AVX2 + FMA build, or null when this binary has none (not x86-64) or this CPU cannot run
// it.
const MatMulKernels* Avx2FmaMatMulKernels();

// The fastest build this CPU runs, chosen once per process. Thread-safe.
const MatMulKernels& SelectedMatMulKernels();

}  // namespace cachemgr::engine
