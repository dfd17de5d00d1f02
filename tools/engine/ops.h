// The dense math of a Llama forward pass on float32 host arrays. Matrices are row-major; a
// weight W is [out, in] and MatMul computes y = x W^T for a batch of rows. The dot-product
// loops are built for the baseline target and for AVX2 + FMA, picked at run time
// (matmul_kernels.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include "tools/engine/checkpoint.h"
#include "tools/engine/thread_pool.h"

namespace cachemgr::engine {

// y[t][o] = sum_i x[t][i] * w[o][i] for t < rows, o < out; x [rows, in], w [out, in],
// y [rows, out]. The output rows are split across the pool's threads.
void MatMul(ThreadPool& pool, const float* x, size_t rows, size_t in, const float* w, size_t out,
            float* y);

float Dot(const float* a, const float* b, size_t n);
// y += a * x
void Axpy(float a, const float* x, float* y, size_t n);

// out = x / rms(x) * weight, rms(x) = sqrt(mean(x^2) + eps).
void RmsNorm(const float* x, const float* weight, size_t dim, float eps, float* out);

// Rotates `heads` vectors of head_dim at `position` (angle position * theta^(-2i/head_dim),
// computed in double, as cachemgr's compression library does when it un-rotates K).
void ApplyRope(float* x, uint32_t heads, uint32_t head_dim, uint64_t position, double theta,
               RopeStyle style);

// gate[i] = silu(gate[i]) * up[i]
void SwiGlu(float* gate, const float* up, size_t n);

// In place; returns the max logit subtracted (for log-sum-exp callers).
void Softmax(float* x, size_t n);

// log softmax(logits)[target], in double.
double LogProb(const float* logits, size_t n, uint32_t target);

uint32_t Argmax(const float* x, size_t n);

}  // namespace cachemgr::engine
