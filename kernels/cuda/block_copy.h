// CUDA version of vLLM's copy_blocks: copy-on-write copies of whole blocks inside one layer
// tensor in device memory. Same semantics as CopyBlocksCpu (kernels/cpu/block_copy.h).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "cachemgr/kernels/block_copy_types.h"
#include "cachemgr/kernels/kv_layout.h"

namespace cachemgr::kernels {

// Enqueues, on `stream`, for each pair the copy of block `src`'s K and V planes onto block
// `dst`. One CTA per pair; 16-byte copies when layer_base and plane_block_bytes() are 16-byte
// aligned, byte copies otherwise.
// layer_base: device, [layout.layer_bytes()] bytes in `layout.order`.
// pairs:      device, [num_pairs]. The ids live on the device, so the launcher cannot check
//             them: validate the host copy with ValidateBlockCopyPairs (kernels/cpu/block_copy.h)
//             first. The kernel skips pairs with an id >= num_blocks or src == dst (never writes
//             out of bounds); duplicate dsts or a dst that is also a src give an unspecified
//             result.
// Returns INVALID_ARGUMENT for a bad layout (CheckKvLayerLayout), a null pointer with
// num_pairs > 0, or num_pairs > INT32_MAX; INTERNAL with the CUDA error if the launch fails.
// num_pairs == 0 launches nothing. Completion is asynchronous w.r.t. the host.
absl::Status CopyBlocksCuda(const KvLayerLayout& layout, std::byte* layer_base,
                            const BlockCopyPair* pairs, uint32_t num_pairs, cudaStream_t stream);

}  // namespace cachemgr::kernels
