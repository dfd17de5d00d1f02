// CUDA versions of the token-row kernels of kernels/cpu/token_rows.h: gather rows of a paged
// layer to float32, scatter float32 rows back, and compact each KV head's kept rows into whole
// blocks. Same addressing, conversions (cachemgr/kernels/elem_convert.h) and results as the CPU
// twins, bit for bit.
//
// All pointers are device pointers. The index arrays (slots, block table, kept rows) live on the
// device, so the launchers cannot check them: validate the host copies with ValidateTokenSlots /
// ValidateCompaction (kernels/cpu/token_rows.h) first. The kernels skip an out-of-range slot or
// block (they never touch memory outside the layer). Launches are asynchronous on `stream`;
// INVALID_ARGUMENT for a bad layout, a type that does not match layout.elem_bytes, a null pointer
// with work to do or a count beyond the grid limit; INTERNAL with the CUDA error if a launch
// fails.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "cachemgr/kernels/kv_layout.h"

namespace cachemgr::kernels {

// keys, values: [num_slots, num_kv_heads, head_dim] float32 <- the K and V rows at slots[i].
absl::Status GatherTokensF32Cuda(const KvLayerLayout& layout, KvElemType type,
                                 const std::byte* layer_base, const int64_t* slots,
                                 uint32_t num_slots, float* keys, float* values,
                                 cudaStream_t stream);

// The inverse: float32 rows -> `slots` (rounded to the pool's type, nearest even).
absl::Status ScatterTokensF32Cuda(const KvLayerLayout& layout, KvElemType type,
                                  std::byte* layer_base, const int64_t* slots, uint32_t num_slots,
                                  const float* keys, const float* values, cudaStream_t stream);

// Bytes of device scratch CompactHeadsCuda needs for `rows` rows per KV head.
size_t CompactHeadsScratchBytes(const KvLayerLayout& layout, uint32_t rows);

// CompactHeadsCpu's contract: row r of KV head h (K and V) takes token kept[h * rows + r] of
// `block_table` (ascending per head). The GPU has no safe in-place order, so the kept heads are
// first gathered into `scratch` (CompactHeadsScratchBytes) and then written to rows 0..rows-1:
// two kernels on `stream`, the second after the first.
absl::Status CompactHeadsCuda(const KvLayerLayout& layout, std::byte* layer_base,
                              const uint32_t* block_table, const uint32_t* kept, uint32_t rows,
                              std::byte* scratch, cudaStream_t stream);

}  // namespace cachemgr::kernels
