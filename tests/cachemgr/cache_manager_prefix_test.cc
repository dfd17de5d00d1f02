// The prefix store (CacheManager::StorePrefix / MatchPrefix / LoadPrefix): stored blocks keep
// their KV after the sequence and the client that wrote them are gone, are served to any client
// of the pool, are evicted least recently used first only when an Allocate needs them, are
// dropped when their KV changed behind the store's back, and are charged to the budget until
// they go (an idle pool gives way to an Attach that needs its budget).
#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/prefix_store.h"
#include "tests/cachemgr/mapped_client.h"

namespace cachemgr {
namespace {

constexpr uint32_t kLayers = 2, kBlock = 4;

ModelSpec Model(const std::string& name = "m") {
  ModelSpec m;
  m.name = name;
  m.num_layers = kLayers;
  m.num_q_heads = 2;
  m.num_kv_heads = 1;
  m.head_dim = 8;
  m.dtype = DType::kFp32;
  m.block_size = kBlock;
  return m;
}

using Fixture = testing::ManagerFixture;
using testing::ManagerOptions;
using Client = testing::MappedClient;

Client Attach(Fixture& f, const std::string& name, uint32_t num_blocks,
              const std::string& model = "m", uint64_t input_bytes = 4096) {
  return testing::AttachMapped(f.manager, name, Model(model), num_blocks, input_bytes);
}

// The byte pattern of token `t` of layer `l` in plane `plane` of a prompt named by `seed`.
std::byte PatternByte(uint32_t seed, uint32_t l, uint32_t t, kernels::KvPlane plane, size_t i) {
  const uint32_t p = plane == kernels::KvPlane::kKey ? 0 : 1;
  return static_cast<std::byte>((seed * 131 + l * 31 + t * 7 + p * 3 + i) & 0xff);
}

// Allocates `n` tokens of `id` and writes their KV: token t (counted from the sequence's first
// position) gets the pattern of prompt `seed`.
void AllocateAndWrite(Fixture& f, Client& c, const std::string& id, uint32_t n, uint32_t seed) {
  auto alloc = f.manager.Allocate(c.token(), id, n);
  REQUIRE(alloc.ok());
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (uint32_t i = 0; i < n; ++i) {
      const int64_t slot = alloc->layers[l].slot_mapping[i];
      const uint32_t t = static_cast<uint32_t>(alloc->first_position) + i;
      for (auto plane : {kernels::KvPlane::kKey, kernels::KvPlane::kValue}) {
        std::byte* row = c.Row(l, plane, static_cast<uint32_t>(slot / kBlock), slot % kBlock);
        for (size_t b = 0; b < c.layout.token_bytes(); ++b) {
          row[b] = PatternByte(seed, l, t, plane, b);
        }
      }
    }
  }
}

// Whether the first `tokens` rows of `blocks` (one table per layer) hold prompt `seed`.
bool HoldsPrompt(Client& c, const SequenceSnapshot& seq, uint32_t tokens, uint32_t seed) {
  for (uint32_t l = 0; l < kLayers; ++l) {
    if (seq.layers[l].block_ids.size() * kBlock < tokens) return false;
    for (uint32_t t = 0; t < tokens; ++t) {
      const uint32_t block = seq.layers[l].block_ids[t / kBlock];
      for (auto plane : {kernels::KvPlane::kKey, kernels::KvPlane::kValue}) {
        const std::byte* row = c.Row(l, plane, block, t % kBlock);
        for (size_t b = 0; b < c.layout.token_bytes(); ++b) {
          if (row[b] != PatternByte(seed, l, t, plane, b)) return false;
        }
      }
    }
  }
  return true;
}

std::vector<std::optional<uint64_t>> Digests(Fixture& f, const std::string& token,
                                             const std::string& id) {
  auto seq = f.manager.GetSequence(token, id, /*include_kv_digest=*/true);
  REQUIRE(seq.ok());
  std::vector<std::optional<uint64_t>> out;
  for (const auto& l : seq->layers) out.push_back(l.kv_digest);
  return out;
}

uint64_t Charge(size_t hash_bytes) { return PrefixStore::ChargeBytes(hash_bytes, kLayers); }

const PoolSnapshot* FindPool(const StatsSnapshot& s, const std::string& model) {
  for (const PoolSnapshot& p : s.pools) {
    if (p.model_name == model) return &p;
  }
  return nullptr;
}

uint32_t FreeBlocks(Fixture& f, const std::string& model = "m") {
  const StatsSnapshot s = f.manager.Stats();
  const PoolSnapshot* p = FindPool(s, model);
  REQUIRE(p != nullptr);
  return p->layers[0].free_blocks;
}

bool SameCounters(const PrefixCounters& a, const PrefixCounters& b) {
  return a.stored == b.stored && a.hits == b.hits && a.misses == b.misses &&
         a.evictions == b.evictions && a.corrupt == b.corrupt &&
         a.pools_reclaimed == b.pools_reclaimed;
}

TEST_CASE("StorePrefix then LoadPrefix serves the stored blocks with their KV", "[cpu]") {
  Fixture f;
  Client c = Attach(f, "engine", 16);
  const uint64_t baseline = f.manager.Stats().memory_used_bytes;
  AllocateAndWrite(f, c, "s", 10, /*seed=*/1);  // 2 full blocks and 2 tokens
  // A reference of the same 8 tokens in blocks of its own: digests are over content.
  AllocateAndWrite(f, c, "ref", 8, /*seed=*/1);
  const auto ref_digests = Digests(f, c.token(), "ref");
  auto s = f.manager.GetSequence(c.token(), "s", false);
  REQUIRE(s.ok());
  const uint64_t before_store = f.manager.Stats().memory_used_bytes;

  auto stored = f.manager.StorePrefix(c.token(), "s", 0, {"h0", "h1"});
  REQUIRE(stored.ok());
  CHECK(stored->stored == 2);
  CHECK(stored->already_stored == 0);
  {
    const StatsSnapshot st = f.manager.Stats();
    CHECK(st.pools[0].prefix_entries == 2);
    CHECK(st.pools[0].prefix_bytes == 2 * Charge(2));
    CHECK(st.pools[0].prefix_only_blocks == 0);  // "s" still holds them
    CHECK(st.pools[0].layers[0].shared_blocks == 2);
    CHECK(st.memory_used_bytes == before_store + 2 * Charge(2));
    CHECK(st.prefix.stored == 2);
  }
  REQUIRE(f.manager.CheckInvariants().ok());

  // Leading hits only: a gap stops the count.
  CHECK(*f.manager.MatchPrefix(c.token(), {"h0", "h1", "h2"}) == 2);
  CHECK(*f.manager.MatchPrefix(c.token(), {"h0", "zz", "h1"}) == 1);
  CHECK(*f.manager.MatchPrefix(c.token(), {"zz", "h0", "h1"}) == 0);
  CHECK(*f.manager.MatchPrefix(c.token(), {"h1"}) == 1);

  // Storing again dedupes; so does a hash repeated within one call.
  auto again = f.manager.StorePrefix(c.token(), "s", 0, {"h0", "h1"});
  REQUIRE(again.ok());
  CHECK(again->stored == 0);
  CHECK(again->already_stored == 2);
  auto repeated = f.manager.StorePrefix(c.token(), "s", 0, {"r", "r"});
  REQUIRE(repeated.ok());
  CHECK(repeated->stored == 1);
  CHECK(repeated->already_stored == 1);
  CHECK(f.manager.Stats().pools[0].prefix_entries == 3);
  CHECK(f.manager.Stats().memory_used_bytes == before_store + 2 * Charge(2) + Charge(1));
  CHECK(f.manager.Stats().prefix.stored == 3);
  REQUIRE(f.manager.CheckInvariants().ok());

  // The writer's sequence goes; the store keeps its two blocks (block 0 under two hashes).
  REQUIRE(f.manager.Free(c.token(), "s").ok());
  {
    const StatsSnapshot st = f.manager.Stats();
    CHECK(st.pools[0].layers[0].used_blocks == 2 + 2);  // the store's 2 and "ref"'s 2
    CHECK(st.pools[0].prefix_only_blocks == 2 * kLayers);
  }
  REQUIRE(f.manager.CheckInvariants().ok());

  auto loaded = f.manager.LoadPrefix(c.token(), "l", {"h0", "h1", "h2"});
  REQUIRE(loaded.ok());
  CHECK(loaded->loaded_blocks == 2);
  CHECK(loaded->corrupt_blocks == 0);
  REQUIRE(loaded->sequence.has_value());
  CHECK(loaded->sequence->sequence_id == "l");
  CHECK(loaded->sequence->num_positions == 8);
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK(loaded->sequence->layers[l].num_tokens == 8);
    CHECK(
        loaded->sequence->layers[l].block_ids ==
        std::vector<uint32_t>(s->layers[l].block_ids.begin(), s->layers[l].block_ids.begin() + 2));
  }
  CHECK(HoldsPrompt(c, *loaded->sequence, 8, /*seed=*/1));
  CHECK(Digests(f, c.token(), "l") == ref_digests);
  {
    const StatsSnapshot st = f.manager.Stats();
    CHECK(st.prefix.hits == 2);
    CHECK(st.prefix.misses == 1);
    CHECK(st.num_sequences == 2);
  }
  REQUIRE(f.manager.CheckInvariants().ok());

  // The loaded sequence grows like any other: its next token goes to a fresh block.
  auto grown = f.manager.Allocate(c.token(), "l", 1);
  REQUIRE(grown.ok());
  CHECK(grown->first_position == 8);
  CHECK(grown->layers[0].copies.empty());
  CHECK(grown->layers[0].new_block_ids.size() == 1);
  REQUIRE(f.manager.CheckInvariants().ok());

  // No hit: nothing is created.
  auto missed = f.manager.LoadPrefix(c.token(), "none", {"zz", "h0"});
  REQUIRE(missed.ok());
  CHECK(missed->loaded_blocks == 0);
  CHECK_FALSE(missed->sequence.has_value());
  CHECK_FALSE(f.manager.GetSequence(c.token(), "none", false).ok());
  CHECK(f.manager.Stats().num_sequences == 2);
  CHECK(f.manager.Stats().prefix.misses == 3);

  // Everything freed and the client gone: only the pool and the entries are charged; Shutdown
  // releases them too.
  REQUIRE(f.manager.Free(c.token(), "l").ok());
  REQUIRE(f.manager.Free(c.token(), "ref").ok());
  CHECK(f.manager.Stats().memory_used_bytes == baseline + 2 * Charge(2) + Charge(1));
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("prefix calls refuse bad input precisely and change nothing", "[cpu]") {
  Fixture f;
  Client c = Attach(f, "engine", 32);
  AllocateAndWrite(f, c, "s", 10, 1);
  REQUIRE(f.manager.StorePrefix(c.token(), "s", 0, {"h0"}).ok());
  AllocateAndWrite(f, c, "c", 12, 2);
  CompressParams cp;
  cp.policy = *ResolvePreset("streamingllm");
  cp.policy.window = 4;
  cp.target = {compress::TargetKind::kReserveRatio, 0.5};
  cp.input = CompressInput::kNone;
  REQUIRE(f.manager.Compress(c.token(), "c", cp).ok());
  REQUIRE(f.manager.CheckInvariants().ok());

  struct State {
    uint64_t memory = 0;
    uint32_t sequences = 0;
    uint32_t entries = 0;
    uint32_t used = 0;
    PrefixCounters counters;
    std::vector<std::optional<uint64_t>> digests;
  };
  auto take = [&] {
    const StatsSnapshot st = f.manager.Stats();
    State s;
    s.memory = st.memory_used_bytes;
    s.sequences = st.num_sequences;
    s.entries = st.pools[0].prefix_entries;
    s.used = st.pools[0].layers[0].used_blocks;
    s.counters = st.prefix;
    s.digests = Digests(f, c.token(), "s");
    return s;
  };
  const State before = take();
  auto same = [&](const State& now) {
    return now.memory == before.memory && now.sequences == before.sequences &&
           now.entries == before.entries && now.used == before.used &&
           SameCounters(now.counters, before.counters) && now.digests == before.digests;
  };
  auto expect = [&](const absl::Status& status, absl::StatusCode code, const std::string& part) {
    INFO(status.ToString());
    CHECK(status.code() == code);
    CHECK_THAT(std::string(status.message()), Catch::Contains(part));
    CHECK(same(take()));
    REQUIRE(f.manager.CheckInvariants().ok());
  };
  const std::string long_hash(65, 'x');
  const std::vector<std::string> too_many(kMaxPrefixHashesPerCall + 1, "h");
  using Code = absl::StatusCode;

  // StorePrefix.
  expect(f.manager.StorePrefix(c.token(), "s", 0, {}).status(), Code::kInvalidArgument,
         "block_hashes must hold 1-16384 hashes (got 0)");
  expect(f.manager.StorePrefix(c.token(), "s", 0, too_many).status(), Code::kInvalidArgument,
         "block_hashes must hold 1-16384 hashes (got 16385)");
  expect(f.manager.StorePrefix(c.token(), "s", 0, {"a", long_hash}).status(),
         Code::kInvalidArgument, "block_hashes[1] must be 1-64 bytes (got 65)");
  expect(f.manager.StorePrefix(c.token(), "s", 0, {""}).status(), Code::kInvalidArgument,
         "block_hashes[0] must be 1-64 bytes (got 0)");
  // 10 tokens are 2 full blocks: blocks 1 and 2 are not both full.
  expect(f.manager.StorePrefix(c.token(), "s", 1, {"a", "b"}).status(), Code::kInvalidArgument,
         "first_block 1 and 2 block_hashes name blocks up to 2");
  expect(f.manager.StorePrefix(c.token(), "s", UINT32_MAX, {"a"}).status(), Code::kInvalidArgument,
         "has 2 full blocks of 4 tokens");
  expect(f.manager.StorePrefix(c.token(), "c", 0, {"a"}).status(), Code::kFailedPrecondition,
         "sequence_id \"c\" is compressed");
  expect(f.manager.StorePrefix(c.token(), "ghost", 0, {"a"}).status(), Code::kNotFound, "ghost");
  expect(f.manager.StorePrefix("not-a-token", "s", 0, {"a"}).status(), Code::kNotFound,
         "session_token");

  // MatchPrefix.
  expect(f.manager.MatchPrefix(c.token(), {}).status(), Code::kInvalidArgument,
         "block_hashes must hold");
  expect(f.manager.MatchPrefix(c.token(), {"h0", "a", long_hash}).status(), Code::kInvalidArgument,
         "block_hashes[2]");
  expect(f.manager.MatchPrefix("not-a-token", {"h0"}).status(), Code::kNotFound, "session_token");

  // LoadPrefix.
  expect(f.manager.LoadPrefix(c.token(), "s", {"h0"}).status(), Code::kAlreadyExists,
         "sequence_id \"s\" already exists");
  expect(f.manager.LoadPrefix(c.token(), "has space", {"h0"}).status(), Code::kInvalidArgument,
         "sequence_id");
  expect(f.manager.LoadPrefix(c.token(), "n", {}).status(), Code::kInvalidArgument,
         "block_hashes must hold");
  expect(f.manager.LoadPrefix(c.token(), "n", {"h0", long_hash}).status(), Code::kInvalidArgument,
         "block_hashes[1]");
  expect(f.manager.LoadPrefix("not-a-token", "n", {"h0"}).status(), Code::kNotFound,
         "session_token");
}

TEST_CASE("StorePrefix over the budget changes nothing", "[cpu]") {
  // Size the budget from a first run: the pool, the client's input buffer, the sequence, and
  // room for one entry but not two.
  uint64_t used = 0;
  {
    Fixture probe;
    Client c = Attach(probe, "engine", 8);
    REQUIRE(probe.manager.Allocate(c.token(), "s", 8).ok());
    used = probe.manager.Stats().memory_used_bytes;
  }
  Fixture f(ManagerOptions(used + Charge(2) + Charge(2) / 2));
  Client c = Attach(f, "engine", 8);
  AllocateAndWrite(f, c, "s", 8, 1);
  REQUIRE(f.manager.Stats().memory_used_bytes == used);
  auto refused = f.manager.StorePrefix(c.token(), "s", 0, {"h0", "h1"});
  REQUIRE(refused.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains("block_hashes"));
  CHECK(f.manager.Stats().memory_used_bytes == used);
  CHECK(f.manager.Stats().pools[0].prefix_entries == 0);
  CHECK(f.manager.Stats().prefix.stored == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
  auto one = f.manager.StorePrefix(c.token(), "s", 0, {"h0"});
  REQUIRE(one.ok());
  CHECK(one->stored == 1);
  CHECK(f.manager.Stats().memory_used_bytes == used + Charge(2));
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("stored prefixes outlive the client that stored them", "[cpu]") {
  Fixture f;
  Client a = Attach(f, "a", 8);
  AllocateAndWrite(f, a, "s", 8, /*seed=*/7);
  const auto digests = Digests(f, a.token(), "s");
  REQUIRE(f.manager.StorePrefix(a.token(), "s", 0, {"h0", "h1"}).ok());
  auto detached = f.manager.Detach(a.token());
  REQUIRE(detached.ok());
  CHECK(detached->sequences_freed == 1);
  CHECK(detached->blocks_released == 0);  // the store holds them
  {
    const StatsSnapshot st = f.manager.Stats();
    REQUIRE(st.pools.size() == 1);
    CHECK(st.pools[0].pool_id == a.a.pool.pool_id);
    CHECK(st.pools[0].clients == 0);
    CHECK(st.pools[0].prefix_entries == 2);
    CHECK(st.pools[0].prefix_only_blocks == 2 * kLayers);
    CHECK(st.pools[0].layers[0].used_blocks == 2);
    CHECK(st.clients.empty());
    CHECK(st.memory_used_bytes ==
          st.pools[0].bytes + st.pools[0].bookkeeping_bytes + st.pools[0].prefix_bytes);
  }
  REQUIRE(f.manager.CheckInvariants().ok());
  // ExpireLeases does not release a pool its store keeps.
  f.clock.Advance(absl::Minutes(5));
  f.manager.ExpireLeases();
  REQUIRE(f.manager.Stats().pools.size() == 1);

  // Another client of the same owner and model joins that pool and finds A's prefix.
  Client b = Attach(f, "b", 8);
  CHECK(b.a.pool.pool_id == a.a.pool.pool_id);
  CHECK(*f.manager.MatchPrefix(b.token(), {"h0", "h1", "h2"}) == 2);
  // B fills every other block with KV of its own: none of the store's blocks is handed out.
  AllocateAndWrite(f, b, "other", 6 * kBlock, /*seed=*/9);
  CHECK(FreeBlocks(f) == 0);
  auto loaded = f.manager.LoadPrefix(b.token(), "l", {"h0", "h1"});
  REQUIRE(loaded.ok());
  CHECK(loaded->loaded_blocks == 2);
  REQUIRE(loaded->sequence.has_value());
  CHECK(loaded->sequence->owner_client_id == b.a.client_id);
  CHECK(HoldsPrompt(b, *loaded->sequence, 8, /*seed=*/7));
  CHECK(Digests(f, b.token(), "l") == digests);
  REQUIRE(f.manager.CheckInvariants().ok());

  // Another model's pool does not see them.
  Client other = Attach(f, "c", 8, "other-model");
  CHECK(*f.manager.MatchPrefix(other.token(), {"h0"}) == 0);
  REQUIRE(f.manager.CheckInvariants().ok());

  // Idle again, the pool is only a cache: another description of the model takes the name,
  // and the old pool goes with its entries.
  REQUIRE(f.manager.Free(b.token(), "l").ok());
  REQUIRE(f.manager.Detach(b.token()).ok());
  ModelSpec changed = Model("m");
  changed.head_dim = 16;
  auto replaced = f.manager.Attach({"x", changed, 8, 4096});
  REQUIRE(replaced.ok());
  CHECK(replaced->pool.pool_id != a.a.pool.pool_id);
  const StatsSnapshot st = f.manager.Stats();
  CHECK(st.prefix.pools_reclaimed == 1);
  for (const PoolSnapshot& p : st.pools) CHECK(p.prefix_entries == 0);
  CHECK(st.pools.size() == 2);  // "other-model" and the new "m"
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("Allocate evicts store-only entries least recently used first, tails first", "[cpu]") {
  Fixture f;
  Client c = Attach(f, "engine", 8);
  const uint64_t baseline = f.manager.Stats().memory_used_bytes;
  AllocateAndWrite(f, c, "p", 8, 1);
  AllocateAndWrite(f, c, "q", 8, 2);
  REQUIRE(f.manager.StorePrefix(c.token(), "p", 0, {"a0", "a1"}).ok());
  REQUIRE(f.manager.StorePrefix(c.token(), "q", 0, {"b0", "b1"}).ok());
  REQUIRE(f.manager.Free(c.token(), "p").ok());
  REQUIRE(f.manager.Free(c.token(), "q").ok());
  // Chain a is used again after b was stored: b is the least recently used, its tail first.
  auto touched = f.manager.LoadPrefix(c.token(), "la", {"a0", "a1"});
  REQUIRE(touched.ok());
  REQUIRE(touched->loaded_blocks == 2);
  REQUIRE(f.manager.Free(c.token(), "la").ok());
  // MatchPrefix is read-only: asking for b changes no order.
  CHECK(*f.manager.MatchPrefix(c.token(), {"b0", "b1"}) == 2);
  CHECK(FreeBlocks(f) == 4);
  const uint64_t with_entries = f.manager.Stats().memory_used_bytes;
  CHECK(with_entries == baseline + 4 * Charge(2));

  // 4 free blocks cover 4 of the 5 blocks: one entry goes, b1.
  AllocateAndWrite(f, c, "n", 5 * kBlock, 3);
  CHECK(*f.manager.MatchPrefix(c.token(), {"b0", "b1"}) == 1);
  CHECK(*f.manager.MatchPrefix(c.token(), {"a0", "a1"}) == 2);
  CHECK(f.manager.Stats().prefix.evictions == 1);
  CHECK(f.manager.Stats().pools[0].prefix_entries == 3);
  REQUIRE(f.manager.CheckInvariants().ok());
  // One more block: b0.
  REQUIRE(f.manager.Allocate(c.token(), "n", kBlock).ok());
  CHECK(*f.manager.MatchPrefix(c.token(), {"b0"}) == 0);
  CHECK(*f.manager.MatchPrefix(c.token(), {"a0", "a1"}) == 2);
  CHECK(f.manager.Stats().prefix.evictions == 2);
  REQUIRE(f.manager.CheckInvariants().ok());

  // Entries whose blocks a live sequence also holds are never evicted.
  auto held = f.manager.LoadPrefix(c.token(), "hold", {"a0", "a1"});
  REQUIRE(held.ok());
  REQUIRE(held->loaded_blocks == 2);
  REQUIRE(FreeBlocks(f) == 0);
  const uint64_t before_refusal = f.manager.Stats().memory_used_bytes;
  auto refused = f.manager.Allocate(c.token(), "n", 1);
  REQUIRE(refused.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains("layer 0 needs 1 blocks"));
  CHECK(f.manager.Stats().prefix.evictions == 2);
  CHECK(f.manager.Stats().pools[0].prefix_entries == 2);
  CHECK(f.manager.Stats().memory_used_bytes == before_refusal);
  CHECK(HoldsPrompt(c, *held->sequence, 8, 1));
  REQUIRE(f.manager.CheckInvariants().ok());

  // Released, the chain goes tail first.
  REQUIRE(f.manager.Free(c.token(), "hold").ok());
  REQUIRE(f.manager.Allocate(c.token(), "n", 1).ok());
  CHECK(*f.manager.MatchPrefix(c.token(), {"a0", "a1"}) == 1);
  CHECK(f.manager.Stats().prefix.evictions == 3);
  REQUIRE(f.manager.CheckInvariants().ok());

  // Everything freed and evicted: the memory is back where it was before the first store.
  REQUIRE(f.manager.Free(c.token(), "n").ok());
  REQUIRE(f.manager.Allocate(c.token(), "all", 8 * kBlock).ok());
  CHECK(f.manager.Stats().pools[0].prefix_entries == 0);
  CHECK(f.manager.Stats().prefix.evictions == 4);
  REQUIRE(f.manager.Free(c.token(), "all").ok());
  CHECK(f.manager.Stats().memory_used_bytes == baseline);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("an Allocate that eviction cannot satisfy fails and evicts nothing", "[cpu]") {
  Fixture f;
  Client c = Attach(f, "engine", 8);
  AllocateAndWrite(f, c, "live", 4 * kBlock, 1);
  AllocateAndWrite(f, c, "p", 2 * kBlock, 2);
  REQUIRE(f.manager.StorePrefix(c.token(), "p", 0, {"a0", "a1"}).ok());
  REQUIRE(f.manager.Free(c.token(), "p").ok());
  REQUIRE(FreeBlocks(f) == 2);
  const StatsSnapshot before = f.manager.Stats();

  // 5 blocks: 2 free + 2 evictable are not enough.
  auto refused = f.manager.Allocate(c.token(), "n", 5 * kBlock);
  REQUIRE(refused.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(refused.status().message()),
             Catch::Contains("layer 0 needs 5 blocks for num_new_tokens=20 but 2 of 8 are free"));
  // Growing "live" by as much: refused the same way.
  auto grow = f.manager.Allocate(c.token(), "live", 5 * kBlock);
  REQUIRE(grow.status().code() == absl::StatusCode::kResourceExhausted);
  const StatsSnapshot after = f.manager.Stats();
  CHECK(after.pools[0].prefix_entries == 2);
  CHECK(after.prefix.evictions == 0);
  CHECK(after.memory_used_bytes == before.memory_used_bytes);
  CHECK(after.num_sequences == before.num_sequences);
  CHECK(*f.manager.MatchPrefix(c.token(), {"a0", "a1"}) == 2);
  REQUIRE(f.manager.CheckInvariants().ok());

  // 4 blocks are: both entries go.
  REQUIRE(f.manager.Allocate(c.token(), "n", 4 * kBlock).ok());
  CHECK(f.manager.Stats().pools[0].prefix_entries == 0);
  CHECK(f.manager.Stats().prefix.evictions == 2);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("no eviction while an expired client may still write to the pool", "[cpu]") {
  // Blocks the store drops while an expired client's quarantine runs are quarantined too, so
  // evicting then frees nothing: the Allocate fails and the entries stay.
  Fixture f;
  Client a = Attach(f, "a", 8);
  Client b = Attach(f, "b", 8);
  AllocateAndWrite(f, a, "p", 2 * kBlock, 1);
  REQUIRE(f.manager.StorePrefix(a.token(), "p", 0, {"a0", "a1"}).ok());
  REQUIRE(f.manager.Free(a.token(), "p").ok());
  AllocateAndWrite(f, b, "fill", 6 * kBlock, 2);
  REQUIRE(FreeBlocks(f) == 0);
  // a's lease runs out while b renews its own.
  const absl::Duration lease = f.manager.options().lease_timeout;
  f.clock.Advance(lease * 6 / 10);
  REQUIRE(f.manager.Heartbeat(b.token()).ok());
  f.clock.Advance(lease * 6 / 10);
  REQUIRE(f.manager.ExpireLeases() == std::vector<std::string>{a.a.client_id});

  auto refused = f.manager.Allocate(b.token(), "n", 1);
  REQUIRE(refused.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(f.manager.Stats().pools[0].prefix_entries == 2);
  CHECK(f.manager.Stats().prefix.evictions == 0);
  CHECK(f.manager.Stats().pools[0].layers[0].quarantined_blocks == 0);
  REQUIRE(f.manager.CheckInvariants().ok());

  // Once the quarantine is over, eviction makes room.
  REQUIRE(f.manager.Heartbeat(b.token()).ok());
  const absl::Duration quarantine = f.manager.quarantine();
  for (absl::Duration waited; waited <= quarantine; waited += lease / 2) {
    f.clock.Advance(lease / 2);
    REQUIRE(f.manager.Heartbeat(b.token()).ok());
  }
  f.manager.ExpireLeases();
  auto allocated = f.manager.Allocate(b.token(), "n", 1);
  REQUIRE(allocated.ok());
  CHECK(f.manager.Stats().prefix.evictions == 1);
  CHECK(*f.manager.MatchPrefix(b.token(), {"a0", "a1"}) == 1);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("LoadPrefix drops an entry whose KV changed and stops before it", "[cpu]") {
  Fixture f;
  Client c = Attach(f, "engine", 8);
  AllocateAndWrite(f, c, "s", 3 * kBlock, 5);
  auto s = f.manager.GetSequence(c.token(), "s", false);
  REQUIRE(s.ok());
  REQUIRE(f.manager.StorePrefix(c.token(), "s", 0, {"h0", "h1", "h2"}).ok());
  REQUIRE(f.manager.Free(c.token(), "s").ok());
  const uint64_t with_entries = f.manager.Stats().memory_used_bytes;

  // A misbehaving client writes a V byte of the second block's last row in layer 1 through
  // its mapping.
  const uint32_t block1 = s->layers[1].block_ids[1];
  std::byte* row = c.Row(1, kernels::KvPlane::kValue, block1, kBlock - 1);
  row[3] = ~row[3];

  auto loaded = f.manager.LoadPrefix(c.token(), "l", {"h0", "h1", "h2"});
  REQUIRE(loaded.ok());
  CHECK(loaded->loaded_blocks == 1);
  CHECK(loaded->corrupt_blocks == 1);
  REQUIRE(loaded->sequence.has_value());
  CHECK(loaded->sequence->num_positions == kBlock);
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK(loaded->sequence->layers[l].block_ids ==
          std::vector<uint32_t>{s->layers[l].block_ids[0]});
    CHECK(loaded->sequence->layers[l].num_tokens == kBlock);
  }
  CHECK(HoldsPrompt(c, *loaded->sequence, kBlock, 5));
  {
    const StatsSnapshot st = f.manager.Stats();
    CHECK(st.prefix.corrupt == 1);
    CHECK(st.prefix.hits == 1);
    CHECK(st.prefix.misses == 2);
    CHECK(st.pools[0].prefix_entries == 2);  // h0 and h2
    // h1's block is free again; h2 is still stored (only the chain's lookup stops at the gap).
    CHECK(st.pools[0].layers[0].used_blocks == 2);
  }
  CHECK(*f.manager.MatchPrefix(c.token(), {"h0", "h1", "h2"}) == 1);
  CHECK(*f.manager.MatchPrefix(c.token(), {"h2"}) == 1);
  REQUIRE(f.manager.CheckInvariants().ok());
  // The loaded sequence was charged for one block per layer, not three: freeing it gives back
  // all it took.
  REQUIRE(f.manager.Free(c.token(), "l").ok());
  CHECK(f.manager.Stats().memory_used_bytes == with_entries - Charge(2));
  REQUIRE(f.manager.CheckInvariants().ok());

  // The hash can be stored again (from a fresh write of the same prompt).
  AllocateAndWrite(f, c, "s2", 3 * kBlock, 5);
  auto restored = f.manager.StorePrefix(c.token(), "s2", 0, {"h0", "h1", "h2"});
  REQUIRE(restored.ok());
  CHECK(restored->stored == 1);
  CHECK(restored->already_stored == 2);
  REQUIRE(f.manager.Free(c.token(), "s2").ok());
  auto reloaded = f.manager.LoadPrefix(c.token(), "l2", {"h0", "h1", "h2"});
  REQUIRE(reloaded.ok());
  CHECK(reloaded->loaded_blocks == 3);
  CHECK(reloaded->corrupt_blocks == 0);
  REQUIRE(reloaded->sequence.has_value());
  CHECK(HoldsPrompt(c, *reloaded->sequence, 3 * kBlock, 5));
  CHECK(f.manager.Stats().prefix.corrupt == 1);
  REQUIRE(f.manager.CheckInvariants().ok());
  REQUIRE(f.manager.Free(c.token(), "l2").ok());

  // The first block corrupt: nothing is loaded, nothing created.
  const uint32_t block0 = s->layers[0].block_ids[0];
  std::byte* key = c.Row(0, kernels::KvPlane::kKey, block0, 0);
  key[0] = ~key[0];
  const uint32_t sequences = f.manager.Stats().num_sequences;
  auto none = f.manager.LoadPrefix(c.token(), "l3", {"h0", "h1"});
  REQUIRE(none.ok());
  CHECK(none->loaded_blocks == 0);
  CHECK(none->corrupt_blocks == 1);
  CHECK_FALSE(none->sequence.has_value());
  CHECK(f.manager.Stats().num_sequences == sequences);
  CHECK(f.manager.Stats().prefix.corrupt == 2);
  CHECK(*f.manager.MatchPrefix(c.token(), {"h0"}) == 0);
  CHECK(f.manager.Stats().pools[0].prefix_entries == 2);
  REQUIRE(f.manager.CheckInvariants().ok());
}

// What one client of Model() with `num_blocks` blocks and a 4096-byte input buffer costs the
// budget (pool memory, bookkeeping, input buffer), and one with `input_bytes`.
uint64_t AttachCost(uint32_t num_blocks, uint64_t input_bytes = 4096) {
  Fixture probe;
  auto r = probe.manager.Attach({"probe", Model(), num_blocks, input_bytes});
  REQUIRE(r.ok());
  return probe.manager.Stats().memory_used_bytes;
}

// Model "m"'s pool of 8 blocks holding stored prefixes h0, h1 and no client.
void LeaveIdlePool(Fixture& f) {
  Client a = Attach(f, "a", 8, "m");
  AllocateAndWrite(f, a, "s", 2 * kBlock, 1);
  REQUIRE(f.manager.StorePrefix(a.token(), "s", 0, {"h0", "h1"}).ok());
  REQUIRE(f.manager.Detach(a.token()).ok());
}

TEST_CASE("an idle pool gives its budget to an Attach of another model", "[cpu]") {
  const uint64_t cost = AttachCost(8);
  Fixture f(ManagerOptions(cost + cost / 2));
  LeaveIdlePool(f);
  REQUIRE(f.manager.Stats().pools.size() == 1);
  REQUIRE(f.manager.CheckInvariants().ok());

  // Another model's pool of the same size does not fit beside it: the idle pool goes.
  Client b = Attach(f, "b", 8, "n");
  {
    const StatsSnapshot st = f.manager.Stats();
    REQUIRE(st.pools.size() == 1);
    CHECK(st.pools[0].model_name == "n");
    CHECK(st.prefix.pools_reclaimed == 1);
    CHECK(st.prefix.evictions == 2);
    CHECK(st.memory_used_bytes == cost);
  }
  REQUIRE(f.manager.CheckInvariants().ok());
  // m attaches again: a fresh pool, empty store (and n's pool is not idle: no room for m).
  auto refused = f.manager.Attach({"a2", Model("m"), 8, 4096});
  CHECK(refused.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(f.manager.Stats().prefix.pools_reclaimed == 1);
  REQUIRE(f.manager.Detach(b.token()).ok());
  CHECK(f.manager.Stats().memory_used_bytes == 0);
  CHECK(f.manager.Stats().pools.empty());
  Client a2 = Attach(f, "a2", 8, "m");
  CHECK(*f.manager.MatchPrefix(a2.token(), {"h0"}) == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("an Attach that reclaiming cannot satisfy reclaims nothing", "[cpu]") {
  const uint64_t cost = AttachCost(8);
  Fixture f(ManagerOptions(cost + cost / 2));
  LeaveIdlePool(f);
  const StatsSnapshot before = f.manager.Stats();

  // Twice the blocks do not fit the whole budget: the idle pool stays.
  auto refused = f.manager.Attach({"b", Model("n"), 24, 4096});
  REQUIRE(refused.status().code() == absl::StatusCode::kResourceExhausted);
  const StatsSnapshot after = f.manager.Stats();
  REQUIRE(after.pools.size() == 1);
  CHECK(after.pools[0].prefix_entries == 2);
  CHECK(after.prefix.pools_reclaimed == 0);
  CHECK(after.prefix.evictions == 0);
  CHECK(after.memory_used_bytes == before.memory_used_bytes);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("a client joining an idle pool never reclaims that pool", "[cpu]") {
  // The pool, a one-page input buffer and the entries fit; the pool with a three-page buffer
  // and the entries does not (the buffer alone would, were the pool released).
  const uint64_t cost = AttachCost(8);
  Fixture f(ManagerOptions(cost + 2 * Charge(2) + 4096));
  Client a = Attach(f, "a", 8, "m");
  AllocateAndWrite(f, a, "s", 2 * kBlock, 1);
  const auto digests = Digests(f, a.token(), "s");
  REQUIRE(f.manager.StorePrefix(a.token(), "s", 0, {"h0", "h1"}).ok());
  REQUIRE(f.manager.Detach(a.token()).ok());
  const StatsSnapshot before = f.manager.Stats();

  auto refused = f.manager.Attach({"b", Model("m"), 8, 3 * 4096});
  REQUIRE(refused.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains("input_buffer_bytes"));
  {
    const StatsSnapshot after = f.manager.Stats();
    REQUIRE(after.pools.size() == 1);
    CHECK(after.pools[0].pool_id == a.a.pool.pool_id);
    CHECK(after.pools[0].prefix_entries == 2);
    CHECK(after.clients.empty());
    CHECK(after.prefix.pools_reclaimed == 0);
    CHECK(after.memory_used_bytes == before.memory_used_bytes);
  }
  REQUIRE(f.manager.CheckInvariants().ok());

  // With the small buffer it joins and finds the entries.
  Client b = Attach(f, "b", 8, "m");
  CHECK(b.a.pool.pool_id == a.a.pool.pool_id);
  auto loaded = f.manager.LoadPrefix(b.token(), "l", {"h0", "h1"});
  REQUIRE(loaded.ok());
  CHECK(loaded->loaded_blocks == 2);
  CHECK(HoldsPrompt(b, *loaded->sequence, 2 * kBlock, 1));
  CHECK(Digests(f, b.token(), "l") == digests);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("Shutdown releases pools kept by stored prefixes", "[cpu]") {
  Fixture f;
  Client a = Attach(f, "a", 8, "m");
  Client b = Attach(f, "b", 8, "n");
  AllocateAndWrite(f, a, "s", 2 * kBlock, 1);
  AllocateAndWrite(f, b, "t", 2 * kBlock, 2);
  REQUIRE(f.manager.StorePrefix(a.token(), "s", 0, {"h0", "h1"}).ok());
  REQUIRE(f.manager.StorePrefix(b.token(), "t", 0, {"g0"}).ok());
  REQUIRE(f.manager.LoadPrefix(b.token(), "l", {"g0"}).ok());
  REQUIRE(f.manager.Detach(a.token()).ok());  // m is idle, n has a client
  REQUIRE(f.manager.Stats().pools.size() == 2);
  REQUIRE(f.manager.CheckInvariants().ok());
  f.manager.Shutdown();
  const StatsSnapshot st = f.manager.Stats();
  CHECK(st.memory_used_bytes == 0);
  CHECK(st.pools.empty());
  CHECK(st.clients.empty());
  CHECK(st.num_sequences == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("LoadPrefix checks digests outside the lock; a Free meanwhile aborts it", "[cpu]") {
  Fixture f;
  Client c = Attach(f, "engine", 16);
  AllocateAndWrite(f, c, "s", 2 * kBlock, 1);
  REQUIRE(f.manager.StorePrefix(c.token(), "s", 0, {"h0", "h1"}).ok());
  REQUIRE(f.manager.Free(c.token(), "s").ok());
  const StatsSnapshot before = f.manager.Stats();

  f.backend.armed = true;
  absl::StatusOr<LoadPrefixResult> loaded;
  std::thread loader([&] { loaded = f.manager.LoadPrefix(c.token(), "l", {"h0", "h1"}); });
  f.backend.entered.WaitForNotification();
  // Other calls go on while the digests are read; the new sequence is busy meanwhile.
  const bool others_ok = f.manager.Allocate(c.token(), "other", 3).ok() &&
                         *f.manager.MatchPrefix(c.token(), {"h0", "h1"}) == 2;
  auto busy = f.manager.GetSequence(c.token(), "l", false);
  const bool was_busy = busy.ok() && busy->busy == "LoadPrefix";
  const absl::Status grow = f.manager.Allocate(c.token(), "l", 1).status();
  const absl::Status freed = f.manager.Free(c.token(), "l").status();
  f.backend.release.Notify();
  loader.join();
  CHECK(others_ok);
  CHECK(was_busy);
  CHECK(grow.code() == absl::StatusCode::kAborted);
  CHECK(freed.ok());
  REQUIRE(loaded.status().code() == absl::StatusCode::kAborted);
  CHECK_THAT(std::string(loaded.status().message()), Catch::Contains("was freed"));
  REQUIRE(f.manager.Free(c.token(), "other").ok());
  const StatsSnapshot after = f.manager.Stats();
  CHECK(after.memory_used_bytes == before.memory_used_bytes);
  CHECK(after.num_sequences == 0);
  CHECK(after.pools[0].prefix_entries == 2);
  CHECK(after.pools[0].layers[0].used_blocks == 2);
  REQUIRE(f.manager.CheckInvariants().ok());
  auto again = f.manager.LoadPrefix(c.token(), "l", {"h0", "h1"});
  REQUIRE(again.ok());
  CHECK(again->loaded_blocks == 2);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("StorePrefix reads outside the lock; a Free meanwhile stores nothing", "[cpu]") {
  Fixture f;
  Client c = Attach(f, "engine", 16);
  const uint64_t baseline = f.manager.Stats().memory_used_bytes;
  AllocateAndWrite(f, c, "s", 2 * kBlock, 1);

  f.backend.armed = true;
  absl::StatusOr<StorePrefixResult> stored;
  std::thread storer([&] { stored = f.manager.StorePrefix(c.token(), "s", 0, {"h0", "h1"}); });
  f.backend.entered.WaitForNotification();
  // The sequence is busy (its blocks cannot change under the digest); the entries are charged
  // already, not yet visible.
  const absl::Status grow = f.manager.Allocate(c.token(), "s", 1).status();
  const uint32_t matched = *f.manager.MatchPrefix(c.token(), {"h0"});
  const absl::Status freed = f.manager.Free(c.token(), "s").status();
  f.backend.release.Notify();
  storer.join();
  CHECK(grow.code() == absl::StatusCode::kAborted);
  CHECK(matched == 0);
  CHECK(freed.ok());
  REQUIRE(stored.status().code() == absl::StatusCode::kAborted);
  const StatsSnapshot after = f.manager.Stats();
  CHECK(after.pools[0].prefix_entries == 0);
  CHECK(after.prefix.stored == 0);
  CHECK(after.memory_used_bytes == baseline);
  CHECK(after.pools[0].layers[0].used_blocks == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

}  // namespace
}  // namespace cachemgr
