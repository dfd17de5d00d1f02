// CUDA versions of vLLM's reshape_and_cache (scatter new tokens' K/V rows into the paged layer
// tensor in device memory) and of its inverse. Same semantics as WriteKvBySlotCpu and
// ReadKvBySlotCpu (kernels/cpu/write_kv.h).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "cachemgr/kernels/kv_layout.h"

namespace cachemgr::kernels {

// Enqueues, on `stream`, for each token t with slot_mapping[t] != -1, the copy of key row t to
// the K plane and value row t to the V plane at that slot. One CTA per token; 16-byte copies
// when layer_base, key and value are 16-byte aligned and token_bytes() is a multiple of 16,
// byte copies otherwise.
// layer_base:   device, [layout.layer_bytes()] bytes in `layout.order`.
// key, value:   device, [num_tokens, num_kv_heads, head_dim] contiguous elements of
//               layout.elem_bytes each (row t starts at t * layout.token_bytes()).
// slot_mapping: device, [num_tokens]. The slots live on the device, so the launcher cannot
//               check them: validate the host copy with ValidateSlotMapping
//               (kernels/cpu/write_kv.h) first. The kernel skips slots outside
//               [0, num_blocks * block_size) (never writes out of bounds); two tokens mapped to
//               the same slot give an unspecified result.
// Returns INVALID_ARGUMENT for a bad layout (CheckKvLayerLayout), a null pointer with
// num_tokens > 0, or num_tokens > INT32_MAX; INTERNAL with the CUDA error if the launch fails.
// num_tokens == 0 launches nothing. Completion is asynchronous w.r.t. the host.
absl::Status WriteKvBySlotCuda(const KvLayerLayout& layout, std::byte* layer_base,
                               const std::byte* key, const std::byte* value,
                               const int64_t* slot_mapping, uint32_t num_tokens,
                               cudaStream_t stream);

// The inverse (ReadKvBySlotCpu's twin): for each token t with a slot in range, copies the K and V
// rows at that slot to key and value row t (device, [num_tokens, token_bytes]). Same argument
// checks, alignment rule and asynchrony as WriteKvBySlotCuda.
absl::Status ReadKvBySlotCuda(const KvLayerLayout& layout, const std::byte* layer_base,
                              std::byte* key, std::byte* value, const int64_t* slot_mapping,
                              uint32_t num_tokens, cudaStream_t stream);

}  // namespace cachemgr::kernels
