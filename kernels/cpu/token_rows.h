// Token rows of one paged layer as float32, and in-place compaction: the CPU twins of the
// gather, scatter and compaction kernels (kernels/cuda/token_rows.h has the device versions).
//
// Addressing: a slot is block * block_size + offset (vLLM's slot mapping); a token index t of a
// block table lives at slot block_table[t / block_size] * block_size + t % block_size.
// Element conversions are those of cachemgr/kernels/elem_convert.h (exact to float32, round to
// nearest even back). Every function validates all of its arguments before touching memory, so on
// error nothing was read into the outputs or written to the layer.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "cachemgr/kernels/kv_layout.h"

namespace cachemgr::kernels {

// keys, values: [slots.size(), num_kv_heads, head_dim] float32 <- the K and V rows at `slots`.
// INVALID_ARGUMENT for a bad layout, an element type that does not match layout.elem_bytes, or a
// slot outside [0, num_blocks * block_size) (naming its index).
absl::Status GatherTokensF32Cpu(const KvLayerLayout& layout, KvElemType type,
                                const std::byte* layer_base, absl::Span<const int64_t> slots,
                                float* keys, float* values);

// The inverse: rows of keys/values [slots.size(), num_kv_heads, head_dim] float32 -> `slots`.
absl::Status ScatterTokensF32Cpu(const KvLayerLayout& layout, KvElemType type,
                                 std::byte* layer_base, absl::Span<const int64_t> slots,
                                 const float* keys, const float* values);

// Compaction into whole blocks, in place: row r of KV head h (K and V) takes token
// kept[h * rows + r] of `block_table`. REQUIRES (INVALID_ARGUMENT otherwise): kept has
// num_kv_heads * rows entries, strictly ascending per head, each < num_tokens, and the table
// holds ceil(num_tokens / block_size) valid blocks. Ascending order means kept[h][r] >= r, so
// moving rows in increasing r never overwrites a source not yet read.
absl::Status CompactHeadsCpu(const KvLayerLayout& layout, std::byte* layer_base,
                             absl::Span<const uint32_t> block_table, uint32_t num_tokens,
                             absl::Span<const uint32_t> kept, uint32_t rows);

// Checks shared by the CPU twins and the CUDA launchers.
absl::Status ValidateTokenSlots(const KvLayerLayout& layout, KvElemType type,
                                absl::Span<const int64_t> slots);
absl::Status ValidateCompaction(const KvLayerLayout& layout, absl::Span<const uint32_t> block_table,
                                uint32_t num_tokens, absl::Span<const uint32_t> kept,
                                uint32_t rows);

}  // namespace cachemgr::kernels
