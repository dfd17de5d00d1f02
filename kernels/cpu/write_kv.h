// CPU twins of vLLM's reshape_and_cache (scatter tokens' K/V rows into the paged layer tensor)
// and of its inverse (gather rows out of it as stored: what transfers between daemons carry).
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "cachemgr/kernels/kv_layout.h"

namespace cachemgr::kernels {

// Checks a slot mapping against `layout` without touching memory. INVALID_ARGUMENT when the
// layout is not sane (CheckKvLayerLayout) or some slot is < -1 or >= num_blocks * block_size
// (naming the token index and slot). -1 (padding) is valid. Callers of WriteKvBySlotCuda use this
// on the host copy of their mapping.
absl::Status ValidateSlotMapping(const KvLayerLayout& layout,
                                 absl::Span<const int64_t> slot_mapping);

// For each token t with slot_mapping[t] != -1, copies key row t to the K plane and value row t to
// the V plane at that slot (block = slot / block_size, offset = slot % block_size).
// layer_base:   [layout.layer_bytes()] bytes in `layout.order`, host memory.
// key, value:   [num_tokens, num_kv_heads, head_dim] contiguous elements of layout.elem_bytes
//               each (row t starts at t * layout.token_bytes()), num_tokens = slot_mapping.size().
// slot_mapping: [num_tokens]; validated by ValidateSlotMapping before anything is written, so on
//               error the tensor is left unchanged.
// Pointers may be null only if num_tokens is 0. If two tokens map to the same slot, the later
// one wins (the CUDA kernel leaves that case unspecified).
absl::Status WriteKvBySlotCpu(const KvLayerLayout& layout, std::byte* layer_base,
                              const std::byte* key, const std::byte* value,
                              absl::Span<const int64_t> slot_mapping);

// The inverse: for each token t with slot_mapping[t] != -1, copies the K row at that slot to key
// row t and the V row to value row t (rows of padding tokens are left as they are). Same
// arguments and validation as WriteKvBySlotCpu, key and value written instead of the tensor.
absl::Status ReadKvBySlotCpu(const KvLayerLayout& layout, const std::byte* layer_base,
                             std::byte* key, std::byte* value,
                             absl::Span<const int64_t> slot_mapping);

}  // namespace cachemgr::kernels
