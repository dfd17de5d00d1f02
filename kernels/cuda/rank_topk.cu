#include <algorithm>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/rank_topk.h"

namespace cachemgr::kernels {
namespace {

constexpr unsigned kThreads = 256;

size_t Align(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Keys the CPU's comparison order: -0.0 as +0.0, NaN as -infinity. Values: token indices.
__global__ void PrepareKernel(const float* scores, size_t total, uint32_t context, float* keys,
                              uint32_t* indices, uint32_t* offsets, uint32_t num_heads) {
  const size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  if (i <= num_heads) offsets[i] = static_cast<uint32_t>(i * context);
  if (i >= total) return;
  float x = scores[i];
  if (isnan(x)) x = -INFINITY;
  if (x == 0.0f) x = 0.0f;
  keys[i] = x;
  indices[i] = static_cast<uint32_t>(i % context);
}

__global__ void TakeKernel(const uint32_t* sorted, uint32_t context, uint32_t k, uint32_t num_heads,
                           uint32_t* ranked) {
  const size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  if (i >= size_t{num_heads} * k) return;
  const size_t head = i / k;
  ranked[i] = sorted[head * context + i % k];
}

struct Buffers {
  size_t keys_in, keys_out, values_in, values_out, offsets, cub, total;
};

Buffers Plan(uint32_t num_heads, uint32_t context, size_t cub_bytes) {
  const size_t n = size_t{num_heads} * context;
  Buffers b;
  b.keys_in = 0;
  b.keys_out = b.keys_in + Align(n * sizeof(float));
  b.values_in = b.keys_out + Align(n * sizeof(float));
  b.values_out = b.values_in + Align(n * sizeof(uint32_t));
  b.offsets = b.values_out + Align(n * sizeof(uint32_t));
  b.cub = b.offsets + Align((num_heads + 1) * sizeof(uint32_t));
  b.total = b.cub + Align(cub_bytes);
  return b;
}

size_t CubBytes(uint32_t num_heads, uint32_t context) {
  size_t bytes = 0;
  const int n = static_cast<int>(size_t{num_heads} * context);
  cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, bytes, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
      static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr), n,
      static_cast<int>(num_heads), static_cast<const uint32_t*>(nullptr),
      static_cast<const uint32_t*>(nullptr));
  return bytes;
}

}  // namespace

size_t RankTopKScratchBytes(uint32_t num_heads, uint32_t context) {
  return Plan(num_heads, context, CubBytes(num_heads, context)).total;
}

absl::Status RankTopKCuda(const float* scores, uint32_t num_heads, uint32_t context, uint32_t k,
                          uint32_t* ranked, std::byte* scratch, size_t scratch_bytes,
                          cudaStream_t stream) {
  if (k > context) {
    return absl::InvalidArgumentError(
        absl::StrCat("RankTopKCuda: k ", k, " exceeds context ", context));
  }
  const size_t n = size_t{num_heads} * context;
  if (n >= static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError("RankTopKCuda: num_heads * context must be < 2^31");
  }
  if (n == 0 || k == 0) return absl::OkStatus();
  if (scores == nullptr || ranked == nullptr || scratch == nullptr) {
    return absl::InvalidArgumentError("RankTopKCuda: null pointer");
  }
  size_t cub_bytes = CubBytes(num_heads, context);
  const Buffers b = Plan(num_heads, context, cub_bytes);
  if (scratch_bytes < b.total) {
    return absl::InvalidArgumentError(
        absl::StrCat("RankTopKCuda: scratch of ", scratch_bytes, " bytes, needs ", b.total));
  }
  auto* keys_in = reinterpret_cast<float*>(scratch + b.keys_in);
  auto* keys_out = reinterpret_cast<float*>(scratch + b.keys_out);
  auto* values_in = reinterpret_cast<uint32_t*>(scratch + b.values_in);
  auto* values_out = reinterpret_cast<uint32_t*>(scratch + b.values_out);
  auto* offsets = reinterpret_cast<uint32_t*>(scratch + b.offsets);
  const size_t prepare_items = std::max(n, size_t{num_heads} + 1);
  PrepareKernel<<<static_cast<unsigned>((prepare_items + kThreads - 1) / kThreads), kThreads, 0,
                  stream>>>(scores, n, context, keys_in, values_in, offsets, num_heads);
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  // Radix sort is stable: equal keys keep their (ascending index) input order.
  CACHEMGR_CUDA_RETURN_IF_ERROR(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      scratch + b.cub, cub_bytes, keys_in, keys_out, values_in, values_out, static_cast<int>(n),
      static_cast<int>(num_heads), offsets, offsets + 1, 0, sizeof(float) * 8, stream));
  const size_t take = size_t{num_heads} * k;
  TakeKernel<<<static_cast<unsigned>((take + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      values_out, context, k, num_heads, ranked);
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace cachemgr::kernels
