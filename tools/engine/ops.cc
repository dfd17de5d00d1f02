#include "tools/engine/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace cachemgr::engine {
namespace {

typedef float V8 __attribute__((vector_size(32)));

inline V8 Load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float Sum8(V8 v) {
  float s[8];
  std::memcpy(s, &v, sizeof(s));
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

#define CACHEMGR_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))

CACHEMGR_HOT float DotImpl(const float* a, const float* b, size_t n) {
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

// Rows [o0, o1) of the output for every input row; 4 input rows x 2 weight rows per step
// (eight 8-wide accumulators).
CACHEMGR_HOT void MatMulRange(const float* x, size_t rows, size_t in, const float* w, size_t o0,
                              size_t o1, size_t out, float* y) {
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
      for (int k = 0; k < 4; ++k) y[(t + k) * out + o] = DotImpl(x + (t + k) * in, w + o * in, in);
    }
  }
  for (; t < rows; ++t) {
    for (size_t o = o0; o < o1; ++o) y[t * out + o] = DotImpl(x + t * in, w + o * in, in);
  }
}

}  // namespace

float Dot(const float* a, const float* b, size_t n) { return DotImpl(a, b, n); }

void Axpy(float a, const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void MatMul(ThreadPool& pool, const float* x, size_t rows, size_t in, const float* w,
            size_t out, float* y) {
  // Split the weight rows in even-sized chunks so every thread streams its own part of W.
  pool.ParallelFor((out + 1) / 2, [&](size_t begin, size_t end) {
    MatMulRange(x, rows, in, w, 2 * begin, std::min(out, 2 * end), out, y);
  });
}

void RmsNorm(const float* x, const float* weight, size_t dim, float eps, float* out) {
  double ss = 0.0;
  for (size_t i = 0; i < dim; ++i) ss += double{x[i]} * x[i];
  const float scale = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
  for (size_t i = 0; i < dim; ++i) out[i] = x[i] * scale * weight[i];
}

void ApplyRope(float* x, uint32_t heads, uint32_t head_dim, uint64_t position, double theta,
               RopeStyle style) {
  const uint32_t half = head_dim / 2;
  for (uint32_t i = 0; i < half; ++i) {
    const double inv_freq = std::pow(theta, -2.0 * i / static_cast<double>(head_dim));
    const double angle = static_cast<double>(position) * inv_freq;
    const float c = static_cast<float>(std::cos(angle));
    const float s = static_cast<float>(std::sin(angle));
    for (uint32_t h = 0; h < heads; ++h) {
      float* v = x + size_t{h} * head_dim;
      float& a = style == RopeStyle::kInterleaved ? v[2 * i] : v[i];
      float& b = style == RopeStyle::kInterleaved ? v[2 * i + 1] : v[i + half];
      const float a0 = a, b0 = b;
      a = a0 * c - b0 * s;
      b = a0 * s + b0 * c;
    }
  }
}

void SwiGlu(float* gate, const float* up, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void Softmax(float* x, size_t n) {
  if (n == 0) return;
  const float max = *std::max_element(x, x + n);
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (size_t i = 0; i < n; ++i) x[i] *= inv;
}

double LogProb(const float* logits, size_t n, uint32_t target) {
  const float max = *std::max_element(logits, logits + n);
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i]) - max);
  return static_cast<double>(logits[target]) - max - std::log(sum);
}

uint32_t Argmax(const float* x, size_t n) {
  return static_cast<uint32_t>(std::max_element(x, x + n) - x);
}

}  // namespace cachemgr::engine
