#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/rope_rows.h"

namespace cachemgr::kernels {
namespace {

// One CTA per (row, head) vector, one thread per pair.
__global__ void RotateKernel(RopePairing pairing, uint32_t head_dim, uint32_t num_pairs,
                             const float* cos_table, const float* sin_table, uint32_t num_positions,
                             const uint32_t* angle_row, uint32_t heads, float* x, float sign) {
  const uint32_t r = blockIdx.x / heads;
  const uint32_t h = blockIdx.x % heads;
  const uint32_t position = angle_row[r];
  if (position >= num_positions) return;
  float* head = x + (size_t{r} * heads + h) * head_dim;
  const float* c = cos_table + size_t{position} * num_pairs;
  const float* s = sin_table + size_t{position} * num_pairs;
  for (uint32_t i = threadIdx.x; i < num_pairs; i += blockDim.x) {
    const uint32_t lo = pairing == RopePairing::kInterleaved ? 2 * i : i;
    const uint32_t hi = pairing == RopePairing::kInterleaved ? 2 * i + 1 : i + num_pairs;
    const float a = head[lo];
    const float b = head[hi];
    const float sn = __fmul_rn(sign, s[i]);
    head[lo] = __fsub_rn(__fmul_rn(a, c[i]), __fmul_rn(b, sn));
    head[hi] = __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, c[i]));
  }
}

}  // namespace

absl::Status RotateRowsCuda(RopePairing pairing, uint32_t head_dim, uint32_t num_pairs,
                            const float* cos, const float* sin, uint32_t num_positions,
                            const uint32_t* angle_row, uint32_t rows, uint32_t heads, float* x,
                            bool inverse, cudaStream_t stream) {
  if (uint64_t{2} * num_pairs > head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("RotateRowsCuda: 2 * num_pairs = ", 2 * uint64_t{num_pairs},
                     " exceeds head_dim ", head_dim));
  }
  const uint64_t vectors = uint64_t{rows} * heads;
  if (vectors == 0 || num_pairs == 0) return absl::OkStatus();
  if (vectors > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError("RotateRowsCuda: rows * heads exceeds the grid limit");
  }
  if (cos == nullptr || sin == nullptr || angle_row == nullptr || x == nullptr) {
    return absl::InvalidArgumentError("RotateRowsCuda: null pointer");
  }
  const unsigned threads = num_pairs >= 64 ? 64 : 32;
  RotateKernel<<<static_cast<unsigned>(vectors), threads, 0, stream>>>(
      pairing, head_dim, num_pairs, cos, sin, num_positions, angle_row, heads, x,
      inverse ? -1.0f : 1.0f);
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace cachemgr::kernels
