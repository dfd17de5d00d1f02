// Per-head top-k ranking on the device: the CUDA twin of compress::RankTopK
// (cachemgr/compress/selection.h). For each of num_heads score rows of `context` floats, the
// first k token indices by descending score, ties to the lower index -- exactly the CPU's
// ranking (a stable segmented radix sort of the scores with their indices; -0.0 is sorted as
// +0.0 and NaN as -infinity, as the CPU compares them). The host then merges the rankings of a
// GQA group round-robin (compress::MergeRankings) or sorts one head's set.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace cachemgr::kernels {

// Bytes of device scratch RankTopKCuda needs.
size_t RankTopKScratchBytes(uint32_t num_heads, uint32_t context);

// Device pointers: scores [num_heads, context]; ranked [num_heads, k] is overwritten.
// INVALID_ARGUMENT for k > context, num_heads * context >= 2^31, or a null pointer with work to
// do; INTERNAL for a CUDA error.
absl::Status RankTopKCuda(const float* scores, uint32_t num_heads, uint32_t context, uint32_t k,
                          uint32_t* ranked, std::byte* scratch, size_t scratch_bytes,
                          cudaStream_t stream);

}  // namespace cachemgr::kernels
