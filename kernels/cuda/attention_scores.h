// Observation-window attention column sums on the device: the CUDA twin of
// compress::AttentionColumnSums (cachemgr/compress/scoring.h, step 1 of the scoring pipeline,
// paper eq. 1-2).
//
//   sums[h][a] = sum over queries j of softmax_a(q_j . k_a / sqrt(head_dim)),  keys a <= p_j,
//
// where query j of num_queries sits at token p_j = num_tokens - num_queries + j (causal), and
// query head h reads KV head h / (num_q_heads / num_kv_heads). Two kernels: per (head, query) an
// online softmax gives the row's max and sum; then per (head, token) the probabilities are
// added over the queries in order (no atomics: the result does not depend on scheduling).
// Logits and probabilities in float with q pre-scaled by a float 1/sqrt(head_dim), like the CPU
// twin; exp is the device's expf clamped at e^-87 (the CPU uses a polynomial), so the two agree
// to a relative ~1e-5, not bit for bit.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace cachemgr::kernels {

struct AttentionShape {
  uint32_t num_tokens = 0;
  uint32_t num_q_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t num_queries = 0;
};

// Bytes of device scratch AttentionColumnSumsCuda needs.
size_t AttentionScratchBytes(const AttentionShape& shape);

// Device pointers: keys [num_tokens, num_kv_heads, head_dim] and queries [num_queries,
// num_q_heads, head_dim], float32 post-RoPE; sums [num_q_heads, num_tokens] is overwritten.
// INVALID_ARGUMENT unless 1 <= num_queries <= num_tokens, num_q_heads % num_kv_heads == 0 and
// head_dim > 0 (the message names the field), or for a null pointer.
absl::Status AttentionColumnSumsCuda(const AttentionShape& shape, const float* keys,
                                     const float* queries, float* sums, std::byte* scratch,
                                     cudaStream_t stream);

}  // namespace cachemgr::kernels
