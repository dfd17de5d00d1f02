// The chaos client's checks (tools/soak/sequence_model.h) on a pool in this process's memory:
// they accept what was written and name what differs: a byte, a digest, a block table, a
// reconstruction outside the codebook's promise, a coded row that changed after it was read,
// and daemon answers that disagree with the model.
#include "tools/soak/sequence_model.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "cachemgr/kernels/kv_digest.h"

namespace cachemgr::soak {
namespace {

using Catch::Contains;
using kernels::KvPlane;

// A pool of 16 blocks x 2 layers (block 4, 2 KV heads, head_dim 8, fp32) in a local buffer, and
// one sequence written into it as the chaos client writes.
struct Fixture {
  kernels::KvLayerLayout layout{kernels::KvOrder::kFlashAttn, 16, 4, 2, 8, 4};
  std::vector<std::vector<std::byte>> memory{2, std::vector<std::byte>(layout.layer_bytes())};
  client::KvPoolView pool{layout, {memory[0].data(), memory[1].data()}};
  KvContent content{2, 8, kernels::KvElemType::kF32};
  SequenceModel model = SequenceModel::Empty("s", 2, 2);
  std::vector<uint32_t> blocks{7, 2, 11};  // 10 tokens: rows 0-3, 4-7, 8-9

  Fixture() {
    model.Append(6, /*seed=*/41);
    model.Append(4, /*seed=*/42);
    for (uint32_t l = 0; l < 2; ++l) {
      for (uint32_t t = 0; t < 10; ++t) {
        const int64_t slot = int64_t{blocks[t / 4]} * 4 + t % 4;
        content.WriteRow(model.seeds[t], l, t, pool.key_at_slot<std::byte>(l, slot),
                         pool.value_at_slot<std::byte>(l, slot));
      }
    }
  }

  // What GetSequence would answer now, digests read from the pool as the daemon does.
  client::SequenceInfo Info() const {
    client::SequenceInfo info;
    info.sequence_id = model.id;
    info.num_positions = model.num_positions;
    info.compressed = model.compressed;
    info.kept_per_layer = model.kept_per_layer;
    for (uint32_t l = 0; l < 2; ++l) {
      client::LayerBlockTable t;
      t.layer = l;
      t.num_tokens = model.layers[l].rows();
      if (!model.layers[l].parked) t.block_ids = blocks;
      t.kv_digest = kernels::DigestLayerTokens(layout, pool.layer_base(l), t.block_ids.data(),
                                               model.layers[l].parked ? 0 : t.num_tokens);
      info.layers.push_back(t);
    }
    return info;
  }

  std::byte* Head(uint32_t layer, uint32_t row, uint32_t head, KvPlane plane) {
    return pool.layer_base(layer) + layout.head_offset(plane, blocks[row / 4], row % 4, head);
  }
};

TEST_CASE("the checks accept what was written and name a changed byte", "[cpu]") {
  Fixture f;
  CheckCounts counts;
  CHECK(CheckSequence(f.Info(), f.pool, f.content, &f.model, &counts).empty());
  CHECK(counts.exact == 2 * 10 * 2 * 2);  // layers x rows x heads x planes

  const client::SequenceInfo before = f.Info();  // the daemon's digest, before the change
  *f.Head(1, 5, 1, KvPlane::kValue) ^= std::byte{1};
  const auto problems = CheckSequence(before, f.pool, f.content, &f.model, &counts);
  REQUIRE(problems.size() == 2);
  CHECK_THAT(problems[0], Contains("layer 1 digest"));
  CHECK_THAT(problems[1], Contains("layer 1 row 5 head 1 V (position 5)") &&
                              Contains("differ from what was written"));
  // The daemon reads the same changed bytes: only the content check fails.
  const auto same_digest = CheckSequence(f.Info(), f.pool, f.content, &f.model, &counts);
  REQUIRE(same_digest.size() == 1);
  CHECK_THAT(same_digest[0], Contains("layer 1 row 5 head 1 V"));
}

TEST_CASE("the checks name answers that disagree with the model", "[cpu]") {
  Fixture f;
  CheckCounts counts;
  client::SequenceInfo info = f.Info();
  info.layers[0].num_tokens = 9;
  info.layers[1].block_ids = {7, 2, 7};
  info.num_positions = 11;
  const auto problems = CheckSequence(info, f.pool, f.content, &f.model, &counts);
  REQUIRE(problems.size() == 3);
  CHECK_THAT(problems[0], Contains("num_positions is 11, expected 10"));
  CHECK_THAT(problems[1], Contains("layer 0 holds 9 rows, expected 10"));
  CHECK_THAT(problems[2], Contains("layer 1 block table repeats a block"));

  // Allocate: a slot off its row's offset in the block, a position that does not follow.
  client::Allocation alloc;
  alloc.first_position = 9;
  alloc.num_positions = 12;
  for (uint32_t l = 0; l < 2; ++l) {
    client::LayerAllocation la;
    la.layer = l;
    la.num_tokens = 12;
    la.slot_mapping = {46, l == 0 ? 48 : 47};  // rows 10 and 11 of block 11
    alloc.layers.push_back(la);
  }
  const auto allocation = CheckAllocation(f.model, false, 2, alloc, f.layout);
  REQUIRE(allocation.size() == 2);
  CHECK_THAT(allocation[0], Contains("first_position is 9, expected 10"));
  CHECK_THAT(allocation[1], Contains("layer 0 row 11 got slot 48"));

  // Compress: kept positions must ascend within the sequence.
  client::CompressResult result;
  for (uint32_t l = 0; l < 2; ++l) {
    client::CompressedLayer c;
    c.layer = l;
    c.kept_per_head = c.num_tokens = 3;
    c.block_ids = {7};
    c.kept_positions = {0, 4, 9, 0, l == 0 ? 9u : 4u, 8};
    result.layers.push_back(c);
  }
  SequenceModel after;
  const auto compressed = CheckCompress(f.model, result, f.layout, 1, 1, &after);
  REQUIRE(compressed.size() == 1);
  CHECK_THAT(compressed[0], Contains("layer 0 head 1 keeps positions not ascending"));
  CHECK(after.layers[0].positions[1] == std::vector<uint32_t>{0, 9, 8});
}

TEST_CASE("a reconstruction is held to the codebook's promise, then to its first read", "[cpu]") {
  Fixture f;
  // Layer 1 as Compress stores a codebook (every row kept), then fetched into the same blocks.
  SequenceModel& m = f.model;
  m.compressed = true;
  m.kept_per_layer = {10, 10};
  m.theta_k = m.theta_v = 0.95f;
  m.layers[1].codebook = true;
  m.layers[1].coded_rows = 10;
  // Reconstructions: every vector turned a little in its first two coordinates (cos >= 0.998,
  // norm kept), and row 3 head 0 K reversed (cos -1).
  for (uint32_t r = 0; r < 10; ++r) {
    for (uint32_t h = 0; h < 2; ++h) {
      for (const KvPlane plane : {KvPlane::kKey, KvPlane::kValue}) {
        float* v = reinterpret_cast<float*>(f.Head(1, r, h, plane));
        if (r == 3 && h == 0 && plane == KvPlane::kKey) {
          for (int i = 0; i < 8; ++i) v[i] = -v[i];
          continue;
        }
        const float c = std::cos(0.05f), s = std::sin(0.05f), x = v[0], y = v[1];
        v[0] = c * x - s * y;
        v[1] = s * x + c * y;
      }
    }
  }
  CheckCounts counts;
  const auto problems = CheckSequence(f.Info(), f.pool, f.content, &m, &counts);
  REQUIRE(problems.size() == 1);
  CHECK_THAT(problems[0],
             Contains("layer 1 row 3 head 0 K (position 3): reconstruction has cos -1"));
  CHECK(counts.reconstructed == 10 * 2 * 2);
  CHECK(counts.exact == 10 * 2 * 2);  // layer 0
  CHECK(m.layers[1].observed_k.size() == 10 * 2 * 8 * sizeof(float));

  // Read again: the bytes first read are the reference now (each problem is reported once).
  counts = {};
  CHECK(CheckSequence(f.Info(), f.pool, f.content, &m, &counts).empty());
  CHECK(counts.unchanged == 10 * 2 * 2);
  *f.Head(1, 7, 1, KvPlane::kValue) ^= std::byte{0x10};
  const auto changed = CheckSequence(f.Info(), f.pool, f.content, &m, &counts);
  REQUIRE(changed.size() == 1);
  CHECK_THAT(changed[0], Contains("layer 1 row 7 head 1 V (position 7): reconstructed bytes "
                                  "changed since they were first read"));
}

TEST_CASE("Fetch and Park answers are checked against the layers asked for", "[cpu]") {
  Fixture f;
  f.model.compressed = true;
  f.model.kept_per_layer = {10, 10};
  f.model.layers[1].codebook = f.model.layers[1].parked = true;
  f.model.layers[1].coded_rows = 10;
  client::FetchedLayer fetched;
  fetched.layer = 1;
  fetched.num_tokens = 10;
  fetched.block_ids = f.blocks;
  fetched.new_blocks = 3;
  fetched.positions = f.model.layers[1].FlatPositions();
  SequenceModel after;
  CHECK(CheckFetch(f.model, {1}, {fetched}, f.layout, &after).empty());
  CHECK_FALSE(after.layers[1].parked);
  fetched.positions[4] = 5;
  const auto problems = CheckFetch(f.model, {1}, {fetched}, f.layout, &after);
  REQUIRE(problems.size() == 1);
  CHECK_THAT(problems[0], Contains("layer 1 row positions differ"));

  // Park of the fetched layer after two appended rows codes exactly those.
  SequenceModel resident = after;
  resident.Append(2, 43);
  client::ParkedLayer parked;
  parked.layer = 1;
  parked.num_tokens = 12;
  parked.rows_appended = 2;
  SequenceModel parked_model;
  CHECK(CheckPark(resident, {}, {parked}, &parked_model).empty());
  CHECK(parked_model.layers[1].parked);
  CHECK(parked_model.layers[1].coded_rows == 12);
  parked.rows_appended = 0;
  CHECK_THAT(CheckPark(resident, {}, {parked}, &parked_model).at(0),
             Contains("coded 0 appended rows, expected 2"));
}

}  // namespace
}  // namespace cachemgr::soak
