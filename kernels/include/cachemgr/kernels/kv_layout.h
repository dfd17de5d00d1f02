// KvLayerLayout: the byte layout of one layer's paged KV tensor, written once and shared by the
// daemon, the clients, the CPU twins and the CUDA kernels.
//
// Two orders, matching vLLM's attention backends:
//   kFlashAttn:  [2, num_blocks, block_size, num_kv_heads, head_dim]   (K plane, then V plane)
//   kFlashInfer: [num_blocks, 2, block_size, num_kv_heads, head_dim]   (K and V per block)
// A slot is block * block_size + offset_in_block (vLLM's slot mapping); -1 marks padding.
//
// The struct is trivially copyable and passed by value to kernels; every method is usable from
// host and device code. Offsets are in bytes from the start of the layer tensor.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define CACHEMGR_HD __host__ __device__ __forceinline__
#else
#define CACHEMGR_HD inline
#endif

namespace cachemgr::kernels {

enum class KvOrder : uint8_t { kFlashAttn = 0, kFlashInfer = 1 };

// Which of the two tensors of a layer.
enum class KvPlane : uint8_t { kKey = 0, kValue = 1 };

// The element type of the tensors (elem_bytes 2, 2, 4). Kernels that convert to or from float32
// take it beside the layout, as vLLM's cache kernels take kv_cache_dtype.
enum class KvElemType : uint8_t { kF16 = 0, kBf16 = 1, kF32 = 2 };

struct KvLayerLayout {
  KvOrder order = KvOrder::kFlashAttn;
  uint32_t num_blocks = 0;
  uint32_t block_size = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t elem_bytes = 0;  // 2 for fp16/bf16, 4 for fp32

  // Bytes of one head's vector.
  CACHEMGR_HD size_t head_bytes() const { return size_t{head_dim} * elem_bytes; }
  // Bytes of one token's K (or V) row: all KV heads.
  CACHEMGR_HD size_t token_bytes() const { return size_t{num_kv_heads} * head_bytes(); }
  // Bytes of one block of one plane (K or V).
  CACHEMGR_HD size_t plane_block_bytes() const { return size_t{block_size} * token_bytes(); }
  // Bytes a block occupies in this layer, K and V together.
  CACHEMGR_HD size_t block_bytes() const { return 2 * plane_block_bytes(); }
  // Bytes of the whole layer tensor.
  CACHEMGR_HD size_t layer_bytes() const { return size_t{num_blocks} * block_bytes(); }

  // Offset of the start of `block`'s plane (block_size contiguous token rows).
  CACHEMGR_HD size_t block_offset(KvPlane plane, uint32_t block) const {
    const size_t p = static_cast<size_t>(plane);
    return order == KvOrder::kFlashAttn ? (p * num_blocks + block) * plane_block_bytes()
                                        : (size_t{block} * 2 + p) * plane_block_bytes();
  }
  // Offset of one token's row (all heads) at `slot_in_block` of `block`.
  CACHEMGR_HD size_t token_offset(KvPlane plane, uint32_t block, uint32_t slot_in_block) const {
    return block_offset(plane, block) + size_t{slot_in_block} * token_bytes();
  }
  // Offset of one head's vector.
  CACHEMGR_HD size_t head_offset(KvPlane plane, uint32_t block, uint32_t slot_in_block,
                                 uint32_t head) const {
    return token_offset(plane, block, slot_in_block) + size_t{head} * head_bytes();
  }
  // Offset of the token row addressed by a vLLM slot (slot >= 0).
  CACHEMGR_HD size_t slot_offset(KvPlane plane, int64_t slot) const {
    return token_offset(plane, static_cast<uint32_t>(slot / block_size),
                        static_cast<uint32_t>(slot % block_size));
  }
};

}  // namespace cachemgr::kernels
