// CPU twin of vLLM's copy_blocks: copy-on-write copies of whole blocks inside one layer tensor.
#pragma once

#include <cstddef>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "cachemgr/kernels/block_copy_types.h"
#include "cachemgr/kernels/kv_layout.h"

namespace cachemgr::kernels {

// Checks a copy list against `layout` without touching memory. INVALID_ARGUMENT (naming the
// pair index and block id) when: the layout is not sane (CheckKvLayerLayout); a src or dst id
// is >= layout.num_blocks; src == dst; a dst appears in two pairs; or a dst is also the src of
// some pair (the result would depend on copy order). An empty list is OK.
// Callers of CopyBlocksCuda use this on the host copy of their pairs.
absl::Status ValidateBlockCopyPairs(const KvLayerLayout& layout,
                                    absl::Span<const BlockCopyPair> pairs);

// For each pair, copies the K plane and the V plane of block `src` onto block `dst`.
// layer_base: [layout.layer_bytes()] bytes in `layout.order`, host memory; may be null only if
//             `pairs` is empty.
// pairs:      [num_pairs], validated by ValidateBlockCopyPairs before any byte is copied; on
//             error the tensor is left unchanged.
absl::Status CopyBlocksCpu(const KvLayerLayout& layout, std::byte* layer_base,
                           absl::Span<const BlockCopyPair> pairs);

}  // namespace cachemgr::kernels
