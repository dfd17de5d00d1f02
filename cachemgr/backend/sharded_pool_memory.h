// ShardedPoolMemory: the memory of a tensor-parallel group's pool (docs/MULTINODE.md, "Groups").
//
// A group of N ranks shares one block table per layer; rank r's memory (a PoolMemory of the
// backend, on the rank's device) holds KV heads [r * H / N, (r + 1) * H / N) of every block. This
// class presents the N shards as one PoolMemory of all H heads, so everything above it (Compress,
// Fetch, Park, the prefix store, transfers) reads and writes the unsharded rows and decides
// exactly what it would decide for the unsharded model. Each call is split by head range and
// run on every shard; scoring runs next to each shard (on its device for CUDA pools).
//
// Digests (DigestLayer) are those of the unsharded layer (each token's K row of all H heads,
// then its V row, in the pool's dtype), so a group's sequence digests equal those of the same
// rows in an unsharded pool (and a transfer between the two checks out).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "cachemgr/backend/device_backend.h"

namespace cachemgr {

// Copies heads [src_first, src_first + count) of `src` [outer, src_heads, inner] to heads
// [dst_first, dst_first + count) of `dst` [outer, dst_heads, inner]. The building block of every
// split and join by head (rows, kept lists, queries, scores, codes).
template <typename T>
void CopyHeadRange(const T* src, uint32_t src_heads, uint32_t src_first, T* dst, uint32_t dst_heads,
                   uint32_t dst_first, uint32_t count, size_t outer, size_t inner) {
  for (size_t o = 0; o < outer; ++o) {
    const T* from = src + (o * src_heads + src_first) * inner;
    T* to = dst + (o * dst_heads + dst_first) * inner;
    std::copy(from, from + size_t{count} * inner, to);
  }
}

class ShardedPoolMemory final : public PoolMemory {
 public:
  // `shards` (at least 2, rank order) have equal layouts, each holding one rank's share of the
  // heads, of one element type. INVALID_ARGUMENT when there are fewer or the layouts differ.
  static absl::StatusOr<std::unique_ptr<ShardedPoolMemory>> Create(
      std::vector<std::unique_ptr<PoolMemory>> shards);

  uint32_t num_shards() const { return static_cast<uint32_t>(shards_.size()); }
  // Rank r's memory: what its client maps (regions, layers, descriptors).
  const PoolMemory& shard(uint32_t rank) const { return *shards_[rank]; }

  // The unsharded layout (all heads).
  const kernels::KvLayerLayout& layout() const override { return layout_; }
  // Every shard's regions, rank order (their total is the pool's size).
  const std::vector<RegionInfo>& regions() const override { return regions_; }
  // Rank 0's placements: clients map their own rank's (shard(r).layers()).
  const std::vector<LayerPlacement>& layers() const override { return shards_[0]->layers(); }
  // Every shard's descriptors, rank order (clients get their own rank's: shard(r).ShareFds()).
  std::vector<int> ShareFds() const override;

  absl::Status CopyBlocks(uint32_t layer, absl::Span<const kernels::BlockCopyPair> pairs) override;
  absl::Status GatherTokens(uint32_t layer, absl::Span<const int64_t> slots, float* keys,
                            float* values) const override;
  absl::Status ScatterTokens(uint32_t layer, absl::Span<const int64_t> slots, const float* keys,
                             const float* values) override;
  // Each shard's rows as stored, joined (or split) by head.
  absl::Status PackRows(uint32_t layer, absl::Span<const int64_t> slots, std::byte* keys,
                        std::byte* values) const override;
  absl::Status UnpackRows(uint32_t layer, absl::Span<const int64_t> slots, const std::byte* keys,
                          const std::byte* values) override;
  absl::Status CompactHeads(uint32_t layer, absl::Span<const uint32_t> block_table,
                            uint32_t num_tokens, absl::Span<const uint32_t> kept,
                            uint32_t rows) override;
  // Each shard scores its query heads against its KV heads (the GQA grouping is the same on
  // every rank: H_q / H_kv query heads per KV head).
  absl::Status AttentionColumnSums(uint32_t layer, absl::Span<const int64_t> slots,
                                   uint32_t num_q_heads, const float* queries, uint32_t num_queries,
                                   float* sums) const override;
  const compress::SimilarityGraphBuilder* similarity_graph() const override {
    return shards_[0]->similarity_graph();
  }
  const compress::TopKRanker* ranker() const override { return shards_[0]->ranker(); }
  bool computes_on_device() const override { return shards_[0]->computes_on_device(); }
  // Each shard gets the codebooks whole and the codes of its heads.
  absl::Status ScatterCodedRows(uint32_t layer, absl::Span<const int64_t> slots,
                                const compress::CodedRows& coded) override;
  // The unsharded layer's digest (see the file comment): rows gathered from the shards.
  absl::StatusOr<uint64_t> DigestLayer(uint32_t layer, absl::Span<const uint32_t> block_table,
                                       uint32_t num_tokens, KvDigest kind) const override;

 private:
  explicit ShardedPoolMemory(std::vector<std::unique_ptr<PoolMemory>> shards);
  // Rows of `count` slots, `inner` elements per head: each shard's read (`read(shard, k, v)`)
  // joined into keys/values [count, all heads, inner]; SplitRows the inverse, one write per
  // shard.
  template <typename T, typename Read>
  absl::Status JoinRows(size_t count, size_t inner, T* keys, T* values, Read read) const;
  template <typename T, typename Write>
  absl::Status SplitRows(size_t count, size_t inner, const T* keys, const T* values, Write write);

  std::vector<std::unique_ptr<PoolMemory>> shards_;
  kernels::KvLayerLayout layout_;
  uint32_t heads_per_shard_ = 0;
  std::vector<RegionInfo> regions_;
};

}  // namespace cachemgr
