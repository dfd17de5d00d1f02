// Digest of one layer's tokens: FNV-1a 64 over the tokens in block-table order, each token's K
// row then its V row (num_kv_heads * head_dim elements each, raw bytes). The daemon computes it
// for GetSequence(include_kv_digest) and clients compute the same to check what they wrote.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cachemgr/kernels/kv_layout.h"

namespace cachemgr::kernels {

inline constexpr uint64_t kFnv1a64Offset = 0xcbf29ce484222325ull;
inline constexpr uint64_t kFnv1a64Prime = 0x100000001b3ull;

inline uint64_t Fnv1a64(const std::byte* data, size_t bytes, uint64_t hash = kFnv1a64Offset) {
  for (size_t i = 0; i < bytes; ++i) {
    hash ^= static_cast<uint64_t>(data[i]);
    hash *= kFnv1a64Prime;
  }
  return hash;
}

// `block_table` holds at least ceil(num_tokens / block_size) valid block ids of this layer.
inline uint64_t DigestLayerTokens(const KvLayerLayout& layout, const std::byte* layer_base,
                                  const uint32_t* block_table, uint32_t num_tokens) {
  uint64_t hash = kFnv1a64Offset;
  for (uint32_t t = 0; t < num_tokens; ++t) {
    const uint32_t block = block_table[t / layout.block_size];
    const uint32_t slot = t % layout.block_size;
    hash = Fnv1a64(layer_base + layout.token_offset(KvPlane::kKey, block, slot),
                   layout.token_bytes(), hash);
    hash = Fnv1a64(layer_base + layout.token_offset(KvPlane::kValue, block, slot),
                   layout.token_bytes(), hash);
  }
  return hash;
}

}  // namespace cachemgr::kernels
