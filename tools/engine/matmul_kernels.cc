// One instruction-set build of the engine's dot-product loops (matmul_kernels.h). CMake compiles
// this file once per instruction set, with CACHEMGR_ISA_TABLE naming the table it defines and
// CACHEMGR_ISA_NAME its MatMulKernels::name. Everything here has internal linkage and the file
// includes no header with inline functions or templates (see
// cachemgr/compress/vector_kernels.h for why).
#include "tools/engine/matmul_kernels.h"

#include <cstddef>
#include <cstring>

#if !defined(CACHEMGR_ISA_TABLE) || !defined(CACHEMGR_ISA_NAME)
#error "CACHEMGR_ISA_TABLE and CACHEMGR_ISA_NAME must name this build's table"
#endif

namespace cachemgr::engine {
namespace {

typedef float V8 __attribute__((vector_size(32)));

V8 Load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

float Sum8(V8 v) {
  float s[8];
  std::memcpy(s, &v, sizeof(s));
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

float Dot(const float* a, const float* b, size_t n) {
  V8 acc0 = {}, acc1 = {};
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 += Load8(a + i) * Load8(b + i);
    acc1 += Load8(a + i + 8) * Load8(b + i + 8);
  }
  for (; i + 8 <= n; i += 8) acc0 += Load8(a + i) * Load8(b + i);
  float s = Sum8(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// 4 input rows x 2 weight rows per step (eight 8-wide accumulators).
void MatMulRows(const float* x, size_t rows, size_t in, const float* w, size_t o0, size_t o1,
                size_t out, float* y) {
  size_t t = 0;
  for (; t + 4 <= rows; t += 4) {
    const float* x0 = x + t * in;
    const float* x1 = x0 + in;
    const float* x2 = x1 + in;
    const float* x3 = x2 + in;
    size_t o = o0;
    for (; o + 2 <= o1; o += 2) {
      const float* w0 = w + o * in;
      const float* w1 = w0 + in;
      V8 a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
      size_t i = 0;
      for (; i + 8 <= in; i += 8) {
        const V8 u = Load8(w0 + i), v = Load8(w1 + i);
        const V8 b0 = Load8(x0 + i), b1 = Load8(x1 + i), b2 = Load8(x2 + i), b3 = Load8(x3 + i);
        a00 += b0 * u;
        a01 += b0 * v;
        a10 += b1 * u;
        a11 += b1 * v;
        a20 += b2 * u;
        a21 += b2 * v;
        a30 += b3 * u;
        a31 += b3 * v;
      }
      float s[4][2] = {{Sum8(a00), Sum8(a01)},
                       {Sum8(a10), Sum8(a11)},
                       {Sum8(a20), Sum8(a21)},
                       {Sum8(a30), Sum8(a31)}};
      for (; i < in; ++i) {
        const float* xs[4] = {x0, x1, x2, x3};
        for (int k = 0; k < 4; ++k) {
          s[k][0] += xs[k][i] * w0[i];
          s[k][1] += xs[k][i] * w1[i];
        }
      }
      for (int k = 0; k < 4; ++k) {
        y[(t + k) * out + o] = s[k][0];
        y[(t + k) * out + o + 1] = s[k][1];
      }
    }
    for (; o < o1; ++o) {
      for (int k = 0; k < 4; ++k) y[(t + k) * out + o] = Dot(x + (t + k) * in, w + o * in, in);
    }
  }
  for (; t < rows; ++t) {
    for (size_t o = o0; o < o1; ++o) y[t * out + o] = Dot(x + t * in, w + o * in, in);
  }
}

}  // namespace

extern const MatMulKernels CACHEMGR_ISA_TABLE;
const MatMulKernels CACHEMGR_ISA_TABLE = {
    .name = CACHEMGR_ISA_NAME,
    .dot = &Dot,
    .matmul_rows = &MatMulRows,
};

}  // namespace cachemgr::engine
