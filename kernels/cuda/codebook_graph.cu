#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/codebook_graph.h"
#include "kernels/cuda/cuda_check.h"

namespace cachemgr::kernels {
namespace {

constexpr unsigned kThreads = 256;
constexpr uint32_t kRowsPerBlock = 4;          // adjacency: 4 rows x 64 columns per CTA
constexpr uint32_t kDimChunk = 32;             // dims staged in shared memory per round
constexpr float kIdenticalCandidate = 0.999f;  // compress::codebook's constant

// One thread per row: sequential double sum, as the CPU.
__global__ void NormalizeKernel(const float* x, uint32_t n, uint32_t dim, float* unit,
                                float* magnitude, uint8_t* nonzero, uint8_t* finite) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float* row = x + size_t{i} * dim;
  double sum = 0.0;
  for (uint32_t k = 0; k < dim; ++k) {
    const double v = static_cast<double>(row[k]);
    sum = __dadd_rn(sum, __dmul_rn(v, v));
  }
  if (!isfinite(sum)) {
    finite[i] = 0;
    nonzero[i] = 0;
    magnitude[i] = 0.0f;
    for (uint32_t k = 0; k < dim; ++k) unit[size_t{i} * dim + k] = 0.0f;
    return;
  }
  finite[i] = 1;
  const double m = sqrt(sum);
  magnitude[i] = static_cast<float>(m);
  nonzero[i] = static_cast<float>(m) > 0.0f ? 1 : 0;
  for (uint32_t k = 0; k < dim; ++k) {
    unit[size_t{i} * dim + k] =
        m > 0.0 ? static_cast<float>(__ddiv_rn(static_cast<double>(row[k]), m)) : 0.0f;
  }
}

// Grid (words, ceil(n / kRowsPerBlock)); thread t: row i0 + t / 64, column 64 w + t % 64.
__global__ void AdjacencyKernel(const float* unit, const uint8_t* nonzero, uint32_t n, uint32_t dim,
                                float theta, uint32_t words, uint64_t* adjacency) {
  __shared__ float b_tile[64][kDimChunk + 1];
  __shared__ float a_tile[kRowsPerBlock][kDimChunk];
  __shared__ uint32_t halves[kRowsPerBlock][2];
  const uint32_t w = blockIdx.x;
  const uint32_t i0 = blockIdx.y * kRowsPerBlock;
  const uint32_t local_row = threadIdx.x / 64;
  const uint32_t local_col = threadIdx.x % 64;
  const uint32_t i = i0 + local_row;
  const uint32_t j = w * 64 + local_col;
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (uint32_t k0 = 0; k0 < dim; k0 += kDimChunk) {
    const uint32_t chunk = min(kDimChunk, dim - k0);
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < 64 * kDimChunk; e += blockDim.x) {
      const uint32_t c = e / kDimChunk, k = e % kDimChunk;
      const uint32_t col = w * 64 + c;
      b_tile[c][k] = (col < n && k < chunk) ? unit[size_t{col} * dim + k0 + k] : 0.0f;
    }
    for (uint32_t e = threadIdx.x; e < kRowsPerBlock * kDimChunk; e += blockDim.x) {
      const uint32_t r = e / kDimChunk, k = e % kDimChunk;
      const uint32_t row = i0 + r;
      a_tile[r][k] = (row < n && k < chunk) ? unit[size_t{row} * dim + k0 + k] : 0.0f;
    }
    __syncthreads();
    for (uint32_t k = 0; k < chunk; ++k) {
      const uint32_t l = (k0 + k) % 8;
      lane[l] = __fadd_rn(lane[l], __fmul_rn(a_tile[local_row][k], b_tile[local_col][k]));
    }
  }
  const float dot = __fadd_rn(__fadd_rn(__fadd_rn(lane[0], lane[1]), __fadd_rn(lane[2], lane[3])),
                              __fadd_rn(__fadd_rn(lane[4], lane[5]), __fadd_rn(lane[6], lane[7])));
  bool edge = false;
  if (i < n && j < n) {
    if (i == j) {
      edge = true;
    } else if (nonzero[i] && nonzero[j]) {
      if (theta < 1.0f && dot > theta) {
        edge = true;
      } else if (dot > kIdenticalCandidate) {
        edge = true;
        const float* a = unit + size_t{i} * dim;
        const float* b = unit + size_t{j} * dim;
        for (uint32_t k = 0; k < dim && edge; ++k) edge = a[k] == b[k];
      }
    }
  }
  const uint32_t bits = __ballot_sync(0xffffffffu, edge);
  if (threadIdx.x % 32 == 0) halves[local_row][local_col / 32] = bits;
  __syncthreads();
  if (local_col == 0 && i < n) {
    adjacency[size_t{i} * words + w] =
        (uint64_t{halves[local_row][1]} << 32) | uint64_t{halves[local_row][0]};
  }
}

__global__ void ReconstructKernel(const float* entries, uint32_t num_entries, const uint32_t* refs,
                                  const float* magnitudes, uint32_t n, uint32_t dim, float* out) {
  const size_t e = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  if (e >= size_t{n} * dim) return;
  const size_t i = e / dim;
  const uint32_t ref = refs[i];
  out[e] =
      ref < num_entries ? __fmul_rn(entries[size_t{ref} * dim + e % dim], magnitudes[i]) : 0.0f;
}

}  // namespace

absl::Status NormalizeRowsCuda(const float* x, uint32_t n, uint32_t dim, float* unit,
                               float* magnitude, uint8_t* nonzero, uint8_t* finite,
                               cudaStream_t stream) {
  if (dim == 0) return absl::InvalidArgumentError("NormalizeRowsCuda: dim is 0");
  if (n == 0) return absl::OkStatus();
  if (x == nullptr || unit == nullptr || magnitude == nullptr || nonzero == nullptr ||
      finite == nullptr) {
    return absl::InvalidArgumentError("NormalizeRowsCuda: null pointer");
  }
  NormalizeKernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      x, n, dim, unit, magnitude, nonzero, finite);
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status SimilarityAdjacencyCuda(const float* unit, const uint8_t* nonzero, uint32_t n,
                                     uint32_t dim, float theta, uint64_t* adjacency,
                                     cudaStream_t stream) {
  if (dim == 0) return absl::InvalidArgumentError("SimilarityAdjacencyCuda: dim is 0");
  if (!(theta > 0.0f && theta <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("SimilarityAdjacencyCuda: theta must be in (0, 1], got ", theta));
  }
  if (n > (1u << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat("SimilarityAdjacencyCuda: ", n, " vectors exceed 2^20"));
  }
  if (n == 0) return absl::OkStatus();
  if (unit == nullptr || nonzero == nullptr || adjacency == nullptr) {
    return absl::InvalidArgumentError("SimilarityAdjacencyCuda: null pointer");
  }
  const uint32_t words = (n + 63) / 64;
  const dim3 grid(words, (n + kRowsPerBlock - 1) / kRowsPerBlock);
  AdjacencyKernel<<<grid, 64 * kRowsPerBlock, 0, stream>>>(unit, nonzero, n, dim, theta, words,
                                                           adjacency);
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status ReconstructCodebookCuda(const float* entries, uint32_t num_entries,
                                     const uint32_t* refs, const float* magnitudes, uint32_t n,
                                     uint32_t dim, float* out, cudaStream_t stream) {
  const size_t total = size_t{n} * dim;
  if (total == 0) return absl::OkStatus();
  if (entries == nullptr || refs == nullptr || magnitudes == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("ReconstructCodebookCuda: null pointer");
  }
  ReconstructKernel<<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0,
                      stream>>>(entries, num_entries, refs, magnitudes, n, dim, out);
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace cachemgr::kernels
