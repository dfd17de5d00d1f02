#include "cachemgr/backend/sharded_pool_memory.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cachemgr/kernels/kv_digest.h"
#include "cachemgr/util/status_macros.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace cachemgr {
namespace {

// Tokens DigestLayer gathers at a time.
constexpr uint32_t kDigestChunkTokens = 1024;

}  // namespace

absl::StatusOr<std::unique_ptr<ShardedPoolMemory>> ShardedPoolMemory::Create(
    std::vector<std::unique_ptr<PoolMemory>> shards) {
  if (shards.size() < 2) {
    return absl::InvalidArgumentError("a sharded pool needs at least 2 shards");
  }
  const kernels::KvLayerLayout& first = shards[0]->layout();
  for (const auto& s : shards) {
    const kernels::KvLayerLayout& l = s->layout();
    if (l.order != first.order || l.num_blocks != first.num_blocks ||
        l.block_size != first.block_size || l.num_kv_heads != first.num_kv_heads ||
        l.head_dim != first.head_dim || l.elem_bytes != first.elem_bytes ||
        s->layers().size() != shards[0]->layers().size()) {
      return absl::InvalidArgumentError("the shards of a pool must have equal layouts");
    }
  }
  return std::unique_ptr<ShardedPoolMemory>(new ShardedPoolMemory(std::move(shards)));
}

ShardedPoolMemory::ShardedPoolMemory(std::vector<std::unique_ptr<PoolMemory>> shards)
    : shards_(std::move(shards)) {
  layout_ = shards_[0]->layout();
  heads_per_shard_ = layout_.num_kv_heads;
  layout_.num_kv_heads = heads_per_shard_ * num_shards();
  for (const auto& s : shards_) {
    regions_.insert(regions_.end(), s->regions().begin(), s->regions().end());
  }
}

std::vector<int> ShardedPoolMemory::ShareFds() const {
  std::vector<int> fds;
  for (const auto& s : shards_) {
    const std::vector<int> own = s->ShareFds();
    fds.insert(fds.end(), own.begin(), own.end());
  }
  return fds;
}

absl::Status ShardedPoolMemory::CopyBlocks(uint32_t layer,
                                           absl::Span<const kernels::BlockCopyPair> pairs) {
  for (auto& s : shards_) RETURN_IF_ERROR(s->CopyBlocks(layer, pairs));
  return absl::OkStatus();
}

template <typename T, typename Read>
absl::Status ShardedPoolMemory::JoinRows(size_t count, size_t inner, T* keys, T* values,
                                         Read read) const {
  std::vector<T> k(count * heads_per_shard_ * inner), v(k.size());
  for (uint32_t r = 0; r < num_shards(); ++r) {
    RETURN_IF_ERROR(read(*shards_[r], k.data(), v.data()));
    for (auto [from, to] : {std::pair{&k, keys}, std::pair{&v, values}}) {
      CopyHeadRange(from->data(), heads_per_shard_, 0, to, layout_.num_kv_heads,
                    r * heads_per_shard_, heads_per_shard_, count, inner);
    }
  }
  return absl::OkStatus();
}

template <typename T, typename Write>
absl::Status ShardedPoolMemory::SplitRows(size_t count, size_t inner, const T* keys,
                                          const T* values, Write write) {
  std::vector<T> k(count * heads_per_shard_ * inner), v(k.size());
  // Every shard validates the same slots, so the first refuses before anything is written.
  for (uint32_t r = 0; r < num_shards(); ++r) {
    for (auto [from, to] : {std::pair{keys, &k}, std::pair{values, &v}}) {
      CopyHeadRange(from, layout_.num_kv_heads, r * heads_per_shard_, to->data(), heads_per_shard_,
                    0, heads_per_shard_, count, inner);
    }
    RETURN_IF_ERROR(write(*shards_[r], k.data(), v.data()));
  }
  return absl::OkStatus();
}

absl::Status ShardedPoolMemory::GatherTokens(uint32_t layer, absl::Span<const int64_t> slots,
                                             float* keys, float* values) const {
  return JoinRows(slots.size(), layout_.head_dim, keys, values,
                  [&](const PoolMemory& shard, float* k, float* v) {
                    return shard.GatherTokens(layer, slots, k, v);
                  });
}

absl::Status ShardedPoolMemory::ScatterTokens(uint32_t layer, absl::Span<const int64_t> slots,
                                              const float* keys, const float* values) {
  return SplitRows(slots.size(), layout_.head_dim, keys, values,
                   [&](PoolMemory& shard, const float* k, const float* v) {
                     return shard.ScatterTokens(layer, slots, k, v);
                   });
}

absl::Status ShardedPoolMemory::PackRows(uint32_t layer, absl::Span<const int64_t> slots,
                                         std::byte* keys, std::byte* values) const {
  return JoinRows(slots.size(), layout_.head_bytes(), keys, values,
                  [&](const PoolMemory& shard, std::byte* k, std::byte* v) {
                    return shard.PackRows(layer, slots, k, v);
                  });
}

absl::Status ShardedPoolMemory::UnpackRows(uint32_t layer, absl::Span<const int64_t> slots,
                                           const std::byte* keys, const std::byte* values) {
  return SplitRows(slots.size(), layout_.head_bytes(), keys, values,
                   [&](PoolMemory& shard, const std::byte* k, const std::byte* v) {
                     return shard.UnpackRows(layer, slots, k, v);
                   });
}

absl::Status ShardedPoolMemory::CompactHeads(uint32_t layer, absl::Span<const uint32_t> block_table,
                                             uint32_t num_tokens, absl::Span<const uint32_t> kept,
                                             uint32_t rows) {
  if (kept.size() != size_t{layout_.num_kv_heads} * rows) {
    return absl::InvalidArgumentError(absl::StrCat("kept holds ", kept.size(), " entries for ",
                                                   layout_.num_kv_heads, " heads x ", rows,
                                                   " rows"));
  }
  const size_t per_shard = size_t{heads_per_shard_} * rows;
  for (uint32_t r = 0; r < num_shards(); ++r) {
    RETURN_IF_ERROR(shards_[r]->CompactHeads(layer, block_table, num_tokens,
                                             kept.subspan(r * per_shard, per_shard), rows));
  }
  return absl::OkStatus();
}

absl::Status ShardedPoolMemory::AttentionColumnSums(uint32_t layer, absl::Span<const int64_t> slots,
                                                    uint32_t num_q_heads, const float* queries,
                                                    uint32_t num_queries, float* sums) const {
  RETURN_IF_ERROR(
      ValidateScoringArgs(layout_, slots.size(), num_q_heads, queries, num_queries, sums));
  const uint32_t q_per_shard = num_q_heads / num_shards();
  const size_t dim = layout_.head_dim;
  std::vector<float> shard_queries(size_t{num_queries} * q_per_shard * dim);
  for (uint32_t r = 0; r < num_shards(); ++r) {
    CopyHeadRange(queries, num_q_heads, r * q_per_shard, shard_queries.data(), q_per_shard, 0,
                  q_per_shard, num_queries, dim);
    // Sums are [num_q_heads, slots]: rank r's rows are contiguous.
    RETURN_IF_ERROR(shards_[r]->AttentionColumnSums(layer, slots, q_per_shard, shard_queries.data(),
                                                    num_queries,
                                                    sums + size_t{r} * q_per_shard * slots.size()));
  }
  return absl::OkStatus();
}

absl::Status ShardedPoolMemory::ScatterCodedRows(uint32_t layer, absl::Span<const int64_t> slots,
                                                 const compress::CodedRows& coded) {
  RETURN_IF_ERROR(ValidateCodedRowsArgs(layout_, slots.size(), coded));
  compress::CodedRows part;
  part.rows = coded.rows;
  part.num_kv_heads = heads_per_shard_;
  part.head_dim = coded.head_dim;
  part.key_entries = coded.key_entries;
  part.value_entries = coded.value_entries;
  part.rope = coded.rope;
  part.angles = coded.angles;
  const size_t vectors = size_t{coded.rows} * heads_per_shard_;
  for (auto* v : {&part.key_refs, &part.value_refs, &part.key_angle_rows}) v->resize(vectors);
  for (auto* v : {&part.key_magnitudes, &part.value_magnitudes}) v->resize(vectors);
  for (uint32_t r = 0; r < num_shards(); ++r) {
    const uint32_t first = r * heads_per_shard_;
    for (auto [from, to] : {std::pair{&coded.key_refs, &part.key_refs},
                            std::pair{&coded.value_refs, &part.value_refs},
                            std::pair{&coded.key_angle_rows, &part.key_angle_rows}}) {
      CopyHeadRange(from->data(), coded.num_kv_heads, first, to->data(), heads_per_shard_, 0,
                    heads_per_shard_, coded.rows, 1);
    }
    for (auto [from, to] : {std::pair{&coded.key_magnitudes, &part.key_magnitudes},
                            std::pair{&coded.value_magnitudes, &part.value_magnitudes}}) {
      CopyHeadRange(from->data(), coded.num_kv_heads, first, to->data(), heads_per_shard_, 0,
                    heads_per_shard_, coded.rows, 1);
    }
    RETURN_IF_ERROR(shards_[r]->ScatterCodedRows(layer, slots, part));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ShardedPoolMemory::DigestLayer(uint32_t layer,
                                                        absl::Span<const uint32_t> block_table,
                                                        uint32_t num_tokens, KvDigest kind) const {
  const uint32_t bs = layout_.block_size;
  if (block_table.size() < (uint64_t{num_tokens} + bs - 1) / bs) {
    return absl::InvalidArgumentError(absl::StrCat("block_table holds ", block_table.size(),
                                                   " blocks, too few for ", num_tokens, " tokens"));
  }
  // The rows as stored (PackRows: the shards' bytes joined by head), hashed row by row.
  const size_t row_bytes = layout_.token_bytes();
  uint64_t hash = kind == KvDigest::kFnv1a64 ? kernels::kFnv1a64Offset : 0;
  std::vector<int64_t> slots;
  std::vector<std::byte> k, v;
  for (uint32_t begin = 0; begin < num_tokens; begin += kDigestChunkTokens) {
    const uint32_t count = std::min(kDigestChunkTokens, num_tokens - begin);
    slots.resize(count);
    for (uint32_t t = 0; t < count; ++t) {
      const uint32_t token = begin + t;
      slots[t] = int64_t{block_table[token / bs]} * bs + token % bs;
    }
    k.resize(count * row_bytes);
    v.resize(k.size());
    RETURN_IF_ERROR(PackRows(layer, slots, k.data(), v.data()));
    for (uint32_t t = 0; t < count; ++t) {
      for (const std::vector<std::byte>* plane : {&k, &v}) {
        const std::byte* row = plane->data() + t * row_bytes;
        hash = kind == KvDigest::kFnv1a64 ? kernels::Fnv1a64(row, row_bytes, hash)
                                          : XXH3_64bits_withSeed(row, row_bytes, hash);
      }
    }
  }
  return hash;
}

}  // namespace cachemgr
