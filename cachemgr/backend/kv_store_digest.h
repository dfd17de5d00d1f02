// The prefix store's integrity digest of one layer's tokens: XXH3-64 over the bytes that
// kernels::DigestLayerTokens (FNV-1a 64, the client-visible kv_digest) covers, in the same
// order, each token's K row then its V row, the hash so far seeding the next row's. Internal to
// the daemon (taken at StorePrefix, checked at LoadPrefix); an order of magnitude faster than
// FNV-1a's byte-at-a-time multiply chain, which is what the store's copies waited on.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cachemgr/kernels/kv_layout.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace cachemgr {

// `block_table` holds at least ceil(num_tokens / block_size) valid block ids of this layer.
inline uint64_t Xxh3LayerTokens(const kernels::KvLayerLayout& layout, const std::byte* layer_base,
                                const uint32_t* block_table, uint32_t num_tokens) {
  uint64_t hash = 0;
  for (uint32_t t = 0; t < num_tokens; ++t) {
    const uint32_t block = block_table[t / layout.block_size];
    const uint32_t slot = t % layout.block_size;
    for (kernels::KvPlane plane : {kernels::KvPlane::kKey, kernels::KvPlane::kValue}) {
      hash = XXH3_64bits_withSeed(layer_base + layout.token_offset(plane, block, slot),
                                  layout.token_bytes(), hash);
    }
  }
  return hash;
}

}  // namespace cachemgr
