#include "tools/engine/ops.h"

#include <algorithm>
#include <cmath>

#include "tools/engine/matmul_kernels.h"

namespace cachemgr::engine {

float Dot(const float* a, const float* b, size_t n) { return SelectedMatMulKernels().dot(a, b, n); }

void Axpy(float a, const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void MatMul(ThreadPool& pool, const float* x, size_t rows, size_t in, const float* w, size_t out,
            float* y) {
  // Split the weight rows in even-sized chunks so every thread streams its own part of W.
  const MatMulKernels& kernels = SelectedMatMulKernels();
  pool.ParallelFor((out + 1) / 2, [&](size_t begin, size_t end) {
    kernels.matmul_rows(x, rows, in, w, 2 * begin, std::min(out, 2 * end), out, y);
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
