#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/attention_scores.h"
#include "kernels/cuda/cuda_check.h"

namespace cachemgr::kernels {
namespace {

constexpr unsigned kRowThreads = 256;
constexpr unsigned kColumnThreads = 128;
constexpr unsigned kQueryChunk = 16;  // queries staged in shared memory per round
constexpr float kMinExponent = -87.0f;

__device__ float Dot(const float* a, const float* b, uint32_t dim) {
  float acc = 0.0f;
  for (uint32_t i = 0; i < dim; ++i) acc += a[i] * b[i];
  return acc;
}

// Combines two online-softmax states (max m, sum s of exp(x - m)).
__device__ void Combine(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  const float mx = fmaxf(m, m2);
  s = s * expf(fmaxf(m - mx, kMinExponent)) + s2 * expf(fmaxf(m2 - mx, kMinExponent));
  m = mx;
}

// Grid (num_queries, num_q_heads). Writes row_max / row_sum [num_q_heads, num_queries].
__global__ void RowSoftmaxKernel(AttentionShape shape, const float* keys, const float* queries,
                                 float scale, float* row_max, float* row_sum) {
  extern __shared__ float shared[];  // head_dim (the scaled query), then 2 * blockDim.x
  const uint32_t j = blockIdx.x;
  const uint32_t h = blockIdx.y;
  const uint32_t group = shape.num_q_heads / shape.num_kv_heads;
  const uint32_t kv = h / group;
  const uint32_t dim = shape.head_dim;
  float* q = shared;
  const float* q_src = queries + (size_t{j} * shape.num_q_heads + h) * dim;
  for (uint32_t i = threadIdx.x; i < dim; i += blockDim.x) q[i] = q_src[i] * scale;
  __syncthreads();
  const uint32_t last = shape.num_tokens - shape.num_queries + j;  // keys 0..last
  float m = -INFINITY, s = 0.0f;
  for (uint32_t a = threadIdx.x; a <= last; a += blockDim.x) {
    const float logit = Dot(q, keys + (size_t{a} * shape.num_kv_heads + kv) * dim, dim);
    Combine(m, s, logit, 1.0f);
  }
  float* ms = shared + dim;
  float* ss = ms + blockDim.x;
  ms[threadIdx.x] = m;
  ss[threadIdx.x] = s;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      float m1 = ms[threadIdx.x], s1 = ss[threadIdx.x];
      Combine(m1, s1, ms[threadIdx.x + stride], ss[threadIdx.x + stride]);
      ms[threadIdx.x] = m1;
      ss[threadIdx.x] = s1;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    row_max[size_t{h} * shape.num_queries + j] = ms[0];
    row_sum[size_t{h} * shape.num_queries + j] = ss[0];
  }
}

// Grid (ceil(num_tokens / blockDim.x), num_q_heads): thread = token a of head h; adds the
// probabilities of every query that sees a, in query order.
__global__ void ColumnSumKernel(AttentionShape shape, const float* keys, const float* queries,
                                float scale, const float* row_max, const float* row_sum,
                                float* sums) {
  extern __shared__ float q_tile[];  // [kQueryChunk, head_dim]
  const uint32_t h = blockIdx.y;
  const uint32_t a = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t group = shape.num_q_heads / shape.num_kv_heads;
  const uint32_t kv = h / group;
  const uint32_t dim = shape.head_dim;
  const uint32_t first_position = shape.num_tokens - shape.num_queries;
  const float* k = keys + (size_t{a < shape.num_tokens ? a : 0} * shape.num_kv_heads + kv) * dim;
  float total = 0.0f;
  for (uint32_t j0 = 0; j0 < shape.num_queries; j0 += kQueryChunk) {
    const uint32_t chunk = min(kQueryChunk, shape.num_queries - j0);
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < chunk * dim; e += blockDim.x) {
      const uint32_t jj = e / dim;
      q_tile[e] = queries[(size_t{j0 + jj} * shape.num_q_heads + h) * dim + e % dim] * scale;
    }
    __syncthreads();
    if (a >= shape.num_tokens) continue;
    for (uint32_t jj = 0; jj < chunk; ++jj) {
      const uint32_t j = j0 + jj;
      if (a > first_position + j) continue;  // causal: query j sees keys 0..p_j
      const float logit = Dot(q_tile + size_t{jj} * dim, k, dim);
      const size_t row = size_t{h} * shape.num_queries + j;
      total += expf(fmaxf(logit - row_max[row], kMinExponent)) / row_sum[row];
    }
  }
  if (a < shape.num_tokens) sums[size_t{h} * shape.num_tokens + a] = total;
}

absl::Status CheckShape(const AttentionShape& s) {
  if (s.head_dim == 0) return absl::InvalidArgumentError("AttentionColumnSumsCuda: head_dim is 0");
  if (s.num_kv_heads == 0 || s.num_q_heads % s.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("AttentionColumnSumsCuda: num_q_heads ", s.num_q_heads,
                     " is not a multiple of num_kv_heads ", s.num_kv_heads));
  }
  if (s.num_queries == 0 || s.num_queries > s.num_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("AttentionColumnSumsCuda: num_queries ", s.num_queries,
                     " outside [1, num_tokens = ", s.num_tokens, "]"));
  }
  if (s.num_queries > 65535 || s.num_q_heads > 65535) {
    return absl::InvalidArgumentError(
        "AttentionColumnSumsCuda: num_queries and num_q_heads must be <= 65535");
  }
  return absl::OkStatus();
}

}  // namespace

size_t AttentionScratchBytes(const AttentionShape& shape) {
  return 2 * sizeof(float) * size_t{shape.num_q_heads} * shape.num_queries;
}

absl::Status AttentionColumnSumsCuda(const AttentionShape& shape, const float* keys,
                                     const float* queries, float* sums, std::byte* scratch,
                                     cudaStream_t stream) {
  if (absl::Status s = CheckShape(shape); !s.ok()) return s;
  if (keys == nullptr || queries == nullptr || sums == nullptr || scratch == nullptr) {
    return absl::InvalidArgumentError("AttentionColumnSumsCuda: null pointer");
  }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(shape.head_dim)));
  float* row_max = reinterpret_cast<float*>(scratch);
  float* row_sum = row_max + size_t{shape.num_q_heads} * shape.num_queries;
  const size_t row_shared = sizeof(float) * (shape.head_dim + 2 * kRowThreads);
  const size_t column_shared = sizeof(float) * kQueryChunk * shape.head_dim;
  if (row_shared > 48 * 1024 || column_shared > 48 * 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("AttentionColumnSumsCuda: head_dim ", shape.head_dim, " too large"));
  }
  RowSoftmaxKernel<<<dim3(shape.num_queries, shape.num_q_heads), kRowThreads, row_shared, stream>>>(
      shape, keys, queries, scale, row_max, row_sum);
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const unsigned column_blocks = (shape.num_tokens + kColumnThreads - 1) / kColumnThreads;
  ColumnSumKernel<<<dim3(column_blocks, shape.num_q_heads), kColumnThreads, column_shared,
                    stream>>>(shape, keys, queries, scale, row_max, row_sum, sums);
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace cachemgr::kernels
