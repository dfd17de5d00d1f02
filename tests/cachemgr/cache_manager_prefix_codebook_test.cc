// Stored prefixes held as codebooks (StorePrefix with PrefixCodebookOptions): a layer whose
// codebook is smaller than its block keeps no block, is charged to the budget and rebuilt into a
// fresh block at LoadPrefix (K re-rotated at the token's position in the prefix); a layer whose
// codebook would not be smaller stays a block, bit for bit. Coded entries give way, least
// recently used first, to any charge the budget cannot otherwise meet, and only when that is
// enough; a load short of fresh blocks serves the leading entries that fit.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cachemgr/cache_manager.h"
#include "cachemgr/compress/rope.h"
#include "cachemgr/prefix_store.h"
#include "tests/cachemgr/mapped_client.h"

namespace cachemgr {
namespace {

constexpr uint32_t kLayers = 2, kHeads = 2, kDim = 16, kBlock = 16;

ModelSpec Model() {
  ModelSpec m;
  m.name = "m";
  m.num_layers = kLayers;
  m.num_q_heads = 2 * kHeads;
  m.num_kv_heads = kHeads;
  m.head_dim = kDim;
  m.dtype = DType::kFp32;
  m.block_size = kBlock;
  m.rope.style = RopeStyle::kInterleaved;
  m.rope.theta = 10000.0;
  return m;
}

PrefixCodebookOptions Thetas(float theta_k, float theta_v) {
  PrefixCodebookOptions o;
  o.theta_k = theta_k;
  o.theta_v = theta_v;
  return o;
}

using Fixture = testing::ManagerFixture;
using testing::ManagerOptions;
using Client = testing::MappedClient;

Client Attach(Fixture& f, const std::string& name, uint32_t num_blocks) {
  Client c = testing::AttachMapped(f.manager, name, Model(), num_blocks);
  REQUIRE(c.layout.token_bytes() == kHeads * kDim * sizeof(float));
  return c;
}

// The float row of `slot` in layer `l`'s plane.
float* Row(Client& c, uint32_t l, kernels::KvPlane plane, int64_t slot) {
  return reinterpret_cast<float*>(
      c.Row(l, plane, static_cast<uint32_t>(slot / kBlock), static_cast<uint32_t>(slot % kBlock)));
}

// Token t's KV as the engine stores it, [kHeads, kDim] per plane. Layer 0 is what a codebook
// codes tightly: every pre-RoPE K a multiple of one of two orthogonal directions (RoPE applied at
// position t), every V of two others. Layer 1 is dissimilar vectors, which a codebook cannot
// hold in fewer bytes than the block.
void TokenKv(uint32_t l, uint32_t t, std::vector<float>* k, std::vector<float>* v) {
  k->assign(kHeads * kDim, 0.0f);
  v->assign(kHeads * kDim, 0.0f);
  for (uint32_t h = 0; h < kHeads; ++h) {
    float* kh = k->data() + h * kDim;
    float* vh = v->data() + h * kDim;
    if (l == 0) {
      kh[(t + h) % 2] = 1.0f + 0.125f * static_cast<float>(t % 7);
      vh[2 + (t * 3 + h) % 2] = 2.0f - 0.0625f * static_cast<float>(t % 5);
    } else {
      std::mt19937 random(t * kHeads + h);
      std::normal_distribution<float> normal;
      for (uint32_t i = 0; i < kDim; ++i) {
        kh[i] = normal(random);
        vh[i] = normal(random);
      }
    }
  }
  compress::RopeParams rope;
  rope.style = compress::RopeStyle::kInterleaved;
  rope.head_dim = kDim;
  const uint32_t position = t;
  REQUIRE(compress::ApplyRope(rope, {&position, 1}, kHeads, absl::MakeSpan(*k)).ok());
}

// Allocates tokens [0, n) of `id` and writes TokenKv of tokens [offset, offset + n) there.
void AllocateAndWrite(Fixture& f, Client& c, const std::string& id, uint32_t n,
                      uint32_t offset = 0) {
  auto alloc = f.manager.Allocate(c.token(), id, n);
  REQUIRE(alloc.ok());
  std::vector<float> k, v;
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (uint32_t t = 0; t < n; ++t) {
      TokenKv(l, offset + t, &k, &v);
      const int64_t slot = alloc->layers[l].slot_mapping[t];
      std::memcpy(Row(c, l, kernels::KvPlane::kKey, slot), k.data(), k.size() * sizeof(float));
      std::memcpy(Row(c, l, kernels::KvPlane::kValue, slot), v.data(), v.size() * sizeof(float));
    }
  }
}

// The largest |stored - original| over layer `l`'s first `tokens` rows of `seq` (holding
// tokens offset on), relative to the row's largest element.
double LayerError(Client& c, const SequenceSnapshot& seq, uint32_t l, uint32_t tokens,
                  uint32_t offset = 0) {
  double worst = 0;
  std::vector<float> k, v;
  for (uint32_t t = 0; t < tokens; ++t) {
    TokenKv(l, offset + t, &k, &v);
    const int64_t slot = int64_t{seq.layers[l].block_ids[t / kBlock]} * kBlock + t % kBlock;
    for (auto [plane, want] :
         {std::pair{kernels::KvPlane::kKey, &k}, std::pair{kernels::KvPlane::kValue, &v}}) {
      const float* got = Row(c, l, plane, slot);
      float scale = 0;
      for (float x : *want) scale = std::max(scale, std::fabs(x));
      for (size_t i = 0; i < want->size(); ++i) {
        worst = std::max(worst, std::fabs(double{got[i]} - (*want)[i]) / scale);
      }
    }
  }
  return worst;
}

bool SameBits(Client& c, const SequenceSnapshot& seq, uint32_t l, uint32_t tokens) {
  std::vector<float> k, v;
  for (uint32_t t = 0; t < tokens; ++t) {
    TokenKv(l, t, &k, &v);
    const int64_t slot = int64_t{seq.layers[l].block_ids[t / kBlock]} * kBlock + t % kBlock;
    if (std::memcmp(Row(c, l, kernels::KvPlane::kKey, slot), k.data(), k.size() * 4) != 0 ||
        std::memcmp(Row(c, l, kernels::KvPlane::kValue, slot), v.data(), v.size() * 4) != 0) {
      return false;
    }
  }
  return true;
}

TEST_CASE("a codebook entry holds no block, is charged, and loads back rebuilt") {
  Fixture f;
  Client writer = Attach(f, "writer", 8);
  const uint64_t attached = f.manager.Stats().memory_used_bytes;
  AllocateAndWrite(f, writer, "s", 2 * kBlock);
  auto stored = f.manager.StorePrefix(writer.token(), "s", 0, {"h0", "h1"}, Thetas(0.98f, 0.95f));
  REQUIRE(stored.ok());
  CHECK(stored->stored == 2);
  // Layer 0 of both entries is coded; layer 1 (dissimilar rows) stays two blocks.
  CHECK(stored->codebook_layers == 2);
  CHECK(stored->codebook_bytes > 0);
  // Two planes of 32 vectors: 2 entries of 16 floats each + a 2-byte reference and a 4-byte
  // magnitude per vector, against 32 * 16 * 4 bytes plain.
  CHECK(stored->codebook_bytes == 2 * 2 * (2 * kDim * 4 + 2 * kBlock * (2 + 4)));
  REQUIRE(f.manager.Free(writer.token(), "s").ok());
  {
    const StatsSnapshot s = f.manager.Stats();
    REQUIRE(s.pools.size() == 1);
    CHECK(s.pools[0].prefix_entries == 2);
    CHECK(s.pools[0].prefix_codebook_layers == 2);
    CHECK(s.pools[0].prefix_codebook_bytes == stored->codebook_bytes);
    CHECK(s.pools[0].prefix_only_blocks == 2);  // layer 1's
    CHECK(s.pools[0].layers[0].free_blocks == 8);
    CHECK(s.pools[0].layers[1].free_blocks == 6);
    // Bookkeeping (hash twice, per layer a block id, a digest and a codebook handle) and the
    // codebooks; the scratch sequence's bookkeeping was refunded with it.
    CHECK(s.pools[0].prefix_bytes ==
          stored->codebook_bytes + PrefixStore::ChargeBytes(2, kLayers, /*coded=*/true) * 2);
    CHECK(s.memory_used_bytes == attached + s.pools[0].prefix_bytes);
  }
  REQUIRE(f.manager.CheckInvariants().ok());

  Client reader = Attach(f, "reader", 8);
  auto loaded = f.manager.LoadPrefix(reader.token(), "r", {"h0", "h1", "h2"});
  REQUIRE(loaded.ok());
  CHECK(loaded->loaded_blocks == 2);
  CHECK(loaded->corrupt_blocks == 0);
  REQUIRE(loaded->sequence.has_value());
  // The coded layer: rebuilt to within float rounding (every vector lies on an entry); K
  // re-rotated at the tokens' positions. The block layer: bit for bit.
  CHECK(LayerError(reader, *loaded->sequence, 0, 2 * kBlock) < 1e-5);
  CHECK(SameBits(reader, *loaded->sequence, 1, 2 * kBlock));
  CHECK(f.manager.Stats().pools[0].layers[0].free_blocks == 6);  // two fresh blocks
  REQUIRE(f.manager.CheckInvariants().ok());
  REQUIRE(f.manager.Free(reader.token(), "r").ok());
  CHECK(f.manager.Stats().pools[0].layers[0].free_blocks == 8);

  // A later block alone: its K was rotated at positions 16..31, and is un-rotated there.
  AllocateAndWrite(f, writer, "s2", 2 * kBlock);
  auto second = f.manager.StorePrefix(writer.token(), "s2", 1, {"g1"}, Thetas(0.98f, 0.95f));
  REQUIRE(second.ok());
  CHECK(second->codebook_layers == 1);
  CHECK(second->codebook_bytes == stored->codebook_bytes / 2);

  // The same block copied to a scratch sequence's token 0 (as the vLLM connector does) names
  // its place in the prompt: coded as tightly, and rebuilt rotated at positions 16..31.
  AllocateAndWrite(f, writer, "scratch", kBlock, kBlock);
  PrefixCodebookOptions placed = Thetas(0.98f, 0.95f);
  placed.first_position = kBlock;
  auto third = f.manager.StorePrefix(writer.token(), "scratch", 0, {"k1"}, placed);
  REQUIRE(third.ok());
  CHECK(third->codebook_layers == 1);
  CHECK(third->codebook_bytes == second->codebook_bytes);
  auto back = f.manager.LoadPrefix(reader.token(), "back", {"k1"});
  REQUIRE(back.ok());
  REQUIRE(back->loaded_blocks == 1);
  CHECK(LayerError(reader, *back->sequence, 0, kBlock, kBlock) < 1e-5);
  // Rows past position 2^32 - 1 are refused before anything changes.
  placed.first_position = uint64_t{UINT32_MAX} - 3;
  auto past = f.manager.StorePrefix(writer.token(), "scratch", 0, {"k2"}, placed);
  REQUIRE(past.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(past.status().message()), Catch::Contains("codebook.first_position"));
  CHECK(f.manager.MatchPrefix(writer.token(), {"k2"}).value() == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("codebook thresholds outside (0, 1] are refused, naming the field, storing nothing") {
  Fixture f;
  Client c = Attach(f, "c", 8);
  AllocateAndWrite(f, c, "s", kBlock);
  const uint64_t before = f.manager.Stats().memory_used_bytes;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (auto [options, field] : {std::pair{Thetas(1.5f, 0.0f), "codebook.theta_k"},
                                std::pair{Thetas(nan, 0.0f), "codebook.theta_k"},
                                std::pair{Thetas(0.0f, -0.25f), "codebook.theta_v"}}) {
    auto r = f.manager.StorePrefix(c.token(), "s", 0, {"h0"}, options);
    REQUIRE(r.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(r.status().message()), Catch::Contains(field));
  }
  CHECK(f.manager.Stats().pools[0].prefix_entries == 0);
  CHECK(f.manager.Stats().memory_used_bytes == before);
  // 0 means the preset's thresholds.
  auto ok = f.manager.StorePrefix(c.token(), "s", 0, {"h0"}, PrefixCodebookOptions{});
  REQUIRE(ok.ok());
  CHECK(ok->codebook_layers == 1);
  REQUIRE(f.manager.CheckInvariants().ok());
}

// Memory used after attaching, what the scratch sequence's bookkeeping adds, and what one coded
// entry adds (measured on a roomy budget).
struct Sizes {
  uint64_t attached = 0, sequence = 0, entry = 0;
};

Sizes Measure() {
  Fixture f;
  Client c = Attach(f, "c", 4);
  Sizes s;
  s.attached = f.manager.Stats().memory_used_bytes;
  AllocateAndWrite(f, c, "s", kBlock);
  s.sequence = f.manager.Stats().memory_used_bytes - s.attached;
  REQUIRE(f.manager.StorePrefix(c.token(), "s", 0, {"a"}, PrefixCodebookOptions{}).ok());
  s.entry = f.manager.Stats().memory_used_bytes - s.attached - s.sequence;
  return s;
}

TEST_CASE("coded entries give way least recently used first when a charge needs the budget") {
  const Sizes sizes = Measure();
  REQUIRE(sizes.entry > 500);
  // Room for the scratch sequence and two and a half entries.
  Fixture f(ManagerOptions(sizes.attached + sizes.sequence + 2 * sizes.entry + sizes.entry / 2));
  Client c = Attach(f, "c", 4);
  REQUIRE(f.manager.Stats().memory_used_bytes == sizes.attached);
  for (const std::string hash : {"a", "b"}) {
    AllocateAndWrite(f, c, "s", kBlock);
    REQUIRE(f.manager.StorePrefix(c.token(), "s", 0, {hash}, PrefixCodebookOptions{}).ok());
    REQUIRE(f.manager.Free(c.token(), "s").ok());
  }
  // "a" used last: "b" is the least recently used.
  auto touched = f.manager.LoadPrefix(c.token(), "l", {"a"});
  REQUIRE(touched.ok());
  REQUIRE(touched->loaded_blocks == 1);
  REQUIRE(f.manager.Free(c.token(), "l").ok());
  AllocateAndWrite(f, c, "s", kBlock);
  auto third = f.manager.StorePrefix(c.token(), "s", 0, {"c"}, PrefixCodebookOptions{});
  REQUIRE(third.ok());
  CHECK(third->stored == 1);
  CHECK(f.manager.MatchPrefix(c.token(), {"a"}).value() == 1);
  CHECK(f.manager.MatchPrefix(c.token(), {"b"}).value() == 0);
  CHECK(f.manager.MatchPrefix(c.token(), {"c"}).value() == 1);
  CHECK(f.manager.Stats().prefix.evictions == 1);
  REQUIRE(f.manager.CheckInvariants().ok());

  // A charge that evicting every entry would not meet evicts nothing.
  auto too_big = f.manager.Allocate(c.token(), "big", 1000 * kBlock);
  REQUIRE(too_big.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(f.manager.Stats().pools[0].prefix_entries == 2);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("a load short of fresh blocks for its codebook layers serves the entries that fit") {
  Fixture f;
  Client c = Attach(f, "c", 4);
  AllocateAndWrite(f, c, "s", 3 * kBlock);
  auto stored =
      f.manager.StorePrefix(c.token(), "s", 0, {"h0", "h1", "h2"}, PrefixCodebookOptions{});
  REQUIRE(stored.ok());
  REQUIRE(stored->codebook_layers == 3);
  REQUIRE(f.manager.Free(c.token(), "s").ok());
  // Each load of h0 takes a fresh block of layer 0 (coded) and none of layer 1 (stored block).
  for (const std::string id : {"x1", "x2"}) {
    auto one = f.manager.LoadPrefix(c.token(), id, {"h0"});
    REQUIRE(one.ok());
    REQUIRE(one->loaded_blocks == 1);
  }
  CHECK(f.manager.Stats().pools[0].layers[0].free_blocks == 2);
  CHECK(f.manager.Stats().pools[0].layers[1].free_blocks == 1);
  // Two free blocks for three coded entries: the first two are served.
  auto some = f.manager.LoadPrefix(c.token(), "l", {"h0", "h1", "h2"});
  REQUIRE(some.ok());
  CHECK(some->loaded_blocks == 2);
  REQUIRE(some->sequence.has_value());
  CHECK(LayerError(c, *some->sequence, 0, 2 * kBlock) < 1e-5);
  CHECK(SameBits(c, *some->sequence, 1, 2 * kBlock));
  // None free: nothing is served and nothing is created; no entry was evicted for it.
  auto none = f.manager.LoadPrefix(c.token(), "l2", {"h0", "h1", "h2"});
  REQUIRE(none.ok());
  CHECK(none->loaded_blocks == 0);
  CHECK_FALSE(none->sequence.has_value());
  CHECK(f.manager.Stats().pools[0].prefix_entries == 3);
  REQUIRE(f.manager.CheckInvariants().ok());
}

}  // namespace
}  // namespace cachemgr
