// The reply bounds against the real encoding: each bound is at least ByteSizeLong of the reply
// proto_convert builds from the largest values the counts allow, and not far above it.
#include "cachemgr/reply_size.h"

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "cachemgr/service/proto_convert.h"

namespace cachemgr {
namespace {

// Upper bounds may be generous, but not so much that they refuse what a client could receive.
void CheckBound(uint64_t bound, size_t actual) {
  INFO("bound " << bound << ", encoded " << actual);
  CHECK(bound >= actual);
  CHECK(bound <= actual + actual / 2 + 2048);
}

TEST_CASE("varint sizes", "[cpu]") {
  CHECK(reply_size::VarintBytes(0) == 1);
  CHECK(reply_size::VarintBytes(127) == 1);
  CHECK(reply_size::VarintBytes(128) == 2);
  CHECK(reply_size::VarintBytes(UINT32_MAX) == 5);
  CHECK(reply_size::VarintBytes(UINT64_MAX) == 10);
}

TEST_CASE("Allocate's bound covers its reply, largest ids and a copy per layer", "[cpu]") {
  for (const auto& [layers, tokens, pool_blocks, bs] :
       {std::tuple{32u, 1000u, 70000u, 16u}, std::tuple{1u, 1u, 1u, 1u},
        std::tuple{5u, 33u, 4194303u, 1024u}, std::tuple{80u, 20000u, 200000u, 16u}}) {
    AllocateResult r;
    r.created = true;
    r.first_position = UINT64_MAX;
    r.num_positions = UINT64_MAX;
    r.layers.resize(layers);
    for (auto& l : r.layers) {
      l.new_block_ids.assign(tokens / bs + 1, pool_blocks - 1);
      l.slot_mapping.assign(tokens, int64_t{pool_blocks} * bs - 1);
      l.num_tokens = UINT32_MAX;
      l.copies.push_back({UINT32_MAX, UINT32_MAX});
    }
    v1::AllocateResponse p;
    AllocateResultToProto(std::string(kMaxSequenceIdLength, 's'), r, &p);
    CheckBound(reply_size::AllocateReplyBytes(layers, tokens, pool_blocks, bs), p.ByteSizeLong());
  }
}

TEST_CASE("the sequence bound covers GetSequence and Fork replies", "[cpu]") {
  SequenceSnapshot s;
  s.sequence_id = std::string(kMaxSequenceIdLength, 'a');
  s.parent_sequence_id = std::string(kMaxSequenceIdLength, 'b');
  s.owner_client_id = "c18446744073709551615";
  s.num_positions = UINT64_MAX;
  s.compressed = true;
  s.compression_policy = "pyramidinfer";
  s.busy = "Compress";
  std::vector<reply_size::LayerCounts> counts;
  for (uint32_t l = 0; l < 40; ++l) {
    LayerTableSnapshot t;
    t.num_tokens = UINT32_MAX;
    t.block_ids.assign(100 + l * 50, 999999);
    t.kv_digest = UINT64_MAX;
    t.codebook = t.parked = true;
    t.key_codebook_size = t.value_codebook_size = UINT32_MAX;
    t.arena_bytes = UINT64_MAX;
    counts.push_back({t.block_ids.size(), 0});
    s.layers.push_back(t);
    s.kept_per_layer.push_back(UINT32_MAX);
  }
  v1::GetSequenceResponse p;
  SequenceToProto(s, p.mutable_sequence());
  CheckBound(reply_size::SequenceReplyBytes(counts, 1000000), p.ByteSizeLong());
}

TEST_CASE("the Compress and Fetch bounds cover their replies", "[cpu]") {
  const uint32_t pool_blocks = 5000, positions = 70000, hkv = 8;
  CompressResult c;
  c.bytes_before = c.bytes_after = c.blocks_released = UINT64_MAX;
  std::vector<FetchedLayerResult> f;
  std::vector<reply_size::LayerCounts> counts;
  for (uint32_t l = 0; l < 24; ++l) {
    const uint32_t rows = 300 + 17 * l;
    CompressedLayerResult cl;
    cl.kept_per_head = cl.num_tokens = UINT32_MAX;
    cl.block_ids.assign(rows / 16 + 1, pool_blocks - 1);
    cl.kept_positions.assign(size_t{hkv} * rows, positions - 1);
    cl.codebook = true;
    cl.key_codebook_size = cl.value_codebook_size = UINT32_MAX;
    cl.bytes_held = UINT64_MAX;
    c.layers.push_back(cl);
    f.push_back({UINT32_MAX, UINT32_MAX, cl.block_ids, cl.kept_positions, UINT32_MAX});
    counts.push_back({cl.block_ids.size(), cl.kept_positions.size()});
  }
  v1::CompressResponse cp;
  CompressResultToProto(c, &cp);
  CheckBound(reply_size::CompressReplyBytes(counts, pool_blocks, positions), cp.ByteSizeLong());
  v1::FetchResponse fp;
  FetchResultToProto(f, &fp);
  CheckBound(reply_size::FetchReplyBytes(counts, pool_blocks, positions), fp.ByteSizeLong());
}

TEST_CASE("absurd counts saturate instead of wrapping", "[cpu]") {
  CHECK(reply_size::AllocateReplyBytes(1024, UINT64_MAX / 2, UINT32_MAX, 1) == UINT64_MAX);
  const std::vector<reply_size::LayerCounts> huge(3, {UINT64_MAX / 3, UINT64_MAX / 3});
  CHECK(reply_size::FetchReplyBytes(huge, UINT32_MAX, UINT64_MAX) == UINT64_MAX);
}

}  // namespace
}  // namespace cachemgr
