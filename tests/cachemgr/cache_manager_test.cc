#include "cachemgr/cache_manager.h"

#include <catch2/catch.hpp>
#include <cstring>
#include <random>

#include "cachemgr/backend/host_backend.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/kernels/kv_digest.h"

namespace cachemgr {
namespace {

ModelSpec SmallModel(const std::string& name = "tiny") {
  ModelSpec m;
  m.name = name;
  m.num_layers = 3;
  m.num_q_heads = 4;
  m.num_kv_heads = 2;
  m.head_dim = 8;
  m.dtype = DType::kFp32;
  m.block_size = 4;
  return m;
}

struct Fixture {
  explicit Fixture(CacheManagerOptions options = {}) : manager(options, &backend, &clock, &hub) {
    hub.Subscribe([this](const Event* e) {
      if (e) events.push_back(*e);
    });
  }

  AttachResult Attach(const std::string& name = "engine", uint32_t num_blocks = 16,
                      ModelSpec model = SmallModel()) {
    auto r = manager.Attach({name, model, num_blocks});
    REQUIRE(r.ok());
    return *r;
  }

  // Total used blocks over all layers of the first pool (0 when there is none).
  uint64_t UsedBlocks() {
    uint64_t used = 0;
    for (const auto& p : manager.Stats().pools) {
      for (const auto& l : p.layers) used += l.used_blocks;
    }
    return used;
  }

  // Declared before the manager: its destructor publishes detach events into it.
  std::vector<Event> events;
  HostBackend backend;
  FakeClock clock;
  EventHub hub;
  CacheManager manager;
};

TEST_CASE("a token from an earlier boot is refused as such, not as an unknown token", "[cpu]") {
  Fixture earlier;
  const AttachResult old = earlier.Attach("a");
  Fixture f;  // a later start of the daemon: another boot id
  REQUIRE(f.manager.boot_id() != earlier.manager.boot_id());
  const AttachResult a = f.Attach("a");
  REQUIRE(f.manager.Allocate(a.session_token, "s", 3).ok());
  const uint64_t used = f.UsedBlocks();

  auto heartbeat = f.manager.Heartbeat(old.session_token);
  REQUIRE(heartbeat.status().code() == absl::StatusCode::kFailedPrecondition);
  const std::string message(heartbeat.status().message());
  CHECK_THAT(message, Catch::Contains("session_token is from an earlier cachemgrd (boot " +
                                      earlier.manager.boot_id()));
  CHECK_THAT(message, Catch::Contains("re-attach"));
  CHECK_THAT(message, !Catch::Contains(old.session_token.substr(17)));  // never the secret
  CHECK(f.manager.Allocate(old.session_token, "s", 1).status().code() ==
        absl::StatusCode::kFailedPrecondition);
  // This boot's id with an unknown secret, and tokens without the format, stay NOT_FOUND; so
  // does a prefix that is not a boot id (never echoed back).
  CHECK(f.manager.Heartbeat(f.manager.boot_id() + ".00").status().code() ==
        absl::StatusCode::kNotFound);
  CHECK(f.manager.Heartbeat("nope").status().code() == absl::StatusCode::kNotFound);
  auto odd = f.manager.Heartbeat("0123456789ABCDEF.x");
  CHECK(odd.status().code() == absl::StatusCode::kNotFound);
  CHECK_THAT(std::string(odd.status().message()), !Catch::Contains("0123456789ABCDEF"));
  // Nothing changed.
  CHECK(f.UsedBlocks() == used);
  CHECK(f.manager.Heartbeat(a.session_token).ok());
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("attach creates one pool per model and shares it", "[cpu]") {
  Fixture f;
  AttachResult a = f.Attach("a");
  AttachResult b = f.Attach("b");
  CHECK(a.pool.pool_id == b.pool.pool_id);
  CHECK(a.client_id != b.client_id);
  // "<boot id>.<128 random bits>": the manager's boot id, then the secret.
  CHECK(f.manager.boot_id().size() == 16);
  CHECK(a.boot_id == f.manager.boot_id());
  CHECK(a.session_token.size() == 16 + 1 + 32);
  CHECK(a.session_token.rfind(f.manager.boot_id() + ".", 0) == 0);
  CHECK(a.session_token != b.session_token);
  CHECK(a.pool.num_blocks == 16);
  CHECK(a.pool.block_bytes == 2 * 4 * 2 * 8 * 4);
  REQUIRE(a.pool.layers.size() == 3);
  for (const auto& l : a.pool.layers) CHECK(l.bytes == 16 * a.pool.block_bytes);
  CHECK(a.pool.layers[1].offset >= a.pool.layers[0].offset + a.pool.layers[0].bytes);
  auto stats = f.manager.Stats();
  REQUIRE(stats.pools.size() == 1);
  CHECK(stats.pools[0].clients == 2);
  CHECK(stats.clients.size() == 2);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("attach fills defaults and validates every field", "[cpu]") {
  Fixture f;
  ModelSpec m = SmallModel();
  m.block_size = 0;
  m.rope.scaling_factor = 0;
  auto ok = f.manager.Attach({"x", m, 8});
  REQUIRE(ok.ok());
  CHECK(ok->pool.model.block_size == 16);
  CHECK(ok->pool.model.rope.scaling_factor == 1.0);

  struct Case {
    std::string what;
    AttachParams params;
    std::string field;
  };
  ModelSpec bad_heads = SmallModel("h");
  bad_heads.num_kv_heads = 3;
  ModelSpec bad_layers = SmallModel("l");
  bad_layers.num_layers = 0;
  ModelSpec bad_theta = SmallModel("t");
  bad_theta.rope.theta = -1;
  ModelSpec bad_rot = SmallModel("r");
  bad_rot.rope.rotary_dim = 3;
  ModelSpec bad_name = SmallModel("has space");
  const std::vector<Case> cases = {
      {"empty client name", {"", SmallModel("e"), 8}, "client_name"},
      {"kv heads not dividing", {"x", bad_heads, 8}, "model.num_kv_heads"},
      {"zero layers", {"x", bad_layers, 8}, "model.num_layers"},
      {"negative theta", {"x", bad_theta, 8}, "model.rope.theta"},
      {"odd rotary dim", {"x", bad_rot, 8}, "model.rope.rotary_dim"},
      {"model name with space", {"x", bad_name, 8}, "model.name"},
  };
  const auto before = f.manager.Stats();
  for (const Case& c : cases) {
    INFO(c.what);
    auto r = f.manager.Attach(c.params);
    REQUIRE(r.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(r.status().message()), Catch::StartsWith(c.field));
  }
  CHECK(f.manager.Stats().clients.size() == before.clients.size());
  CHECK(f.manager.Stats().pools.size() == before.pools.size());
}

TEST_CASE("a different description under an attached model name is refused", "[cpu]") {
  Fixture f;
  f.Attach("a");
  ModelSpec other = SmallModel();
  other.num_layers = 4;
  auto r = f.manager.Attach({"b", other, 16});
  REQUIRE(r.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(r.status().message()), Catch::Contains("tiny"));
  CHECK(f.manager.Stats().clients.size() == 1);
}

TEST_CASE("the memory budget bounds pools", "[cpu]") {
  CacheManagerOptions options;
  const uint64_t block_all_layers = 3 * SmallModel().BlockBytes();
  options.memory_budget_bytes = 100 * block_all_layers;
  options.default_pool_bytes = 40 * block_all_layers;
  Fixture f(options);
  auto r = f.manager.Attach({"a", SmallModel("big"), 101});
  REQUIRE(r.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(r.status().message()), Catch::Contains("num_blocks 101"));
  auto d = f.manager.Attach({"a", SmallModel("default"), 0});
  REQUIRE(d.ok());
  // A default pool's memory (whole pages per layer) and bookkeeping fit default_pool_bytes.
  const PoolSnapshot pool = f.manager.Stats().pools[0];
  CHECK(pool.bytes + pool.bookkeeping_bytes <= options.default_pool_bytes);
  CHECK(d->pool.num_blocks > 30);
  CHECK(d->pool.num_blocks < 40);
  CHECK(f.manager.Stats().memory_used_bytes <= options.memory_budget_bytes);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("allocate fills the tail block before taking new ones", "[cpu]") {
  Fixture f;
  AttachResult a = f.Attach();
  auto first = f.manager.Allocate(a.session_token, "s", 6);  // block_size 4: blocks 0,1
  REQUIRE(first.ok());
  CHECK(first->created);
  CHECK(first->first_position == 0);
  CHECK(first->num_positions == 6);
  REQUIRE(first->layers.size() == 3);
  for (const auto& l : first->layers) {
    CHECK(l.new_block_ids == std::vector<uint32_t>{0, 1});
    CHECK(l.slot_mapping == std::vector<int64_t>{0, 1, 2, 3, 4, 5});
    CHECK(l.num_tokens == 6);
    CHECK(l.copies.empty());
  }
  auto second = f.manager.Allocate(a.session_token, "s", 3);  // slots 6,7 then block 2
  REQUIRE(second.ok());
  CHECK_FALSE(second->created);
  CHECK(second->first_position == 6);
  CHECK(second->layers[0].new_block_ids == std::vector<uint32_t>{2});
  CHECK(second->layers[0].slot_mapping == std::vector<int64_t>{6, 7, 8});
  auto seq = f.manager.GetSequence(a.session_token, "s", false);
  REQUIRE(seq.ok());
  CHECK(seq->num_positions == 9);
  CHECK(seq->layers[2].block_ids == std::vector<uint32_t>{0, 1, 2});
  CHECK(f.UsedBlocks() == 9);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("allocate errors name the field and change nothing", "[cpu]") {
  Fixture f;
  AttachResult a = f.Attach("a", 4);
  AttachResult b = f.Attach("b");
  REQUIRE(f.manager.Allocate(a.session_token, "mine", 5).ok());    // 2 of 4 blocks per layer
  REQUIRE(f.manager.Allocate(b.session_token, "theirs", 1).ok());  // 1 more: 1 free
  const auto before = f.manager.GetSequence("", "mine", true);
  REQUIRE(before.ok());
  const uint64_t used = f.UsedBlocks();

  auto expect = [&](absl::StatusOr<AllocateResult> r, absl::StatusCode code,
                    const std::string& prefix) {
    REQUIRE(r.status().code() == code);
    CHECK_THAT(std::string(r.status().message()), Catch::Contains(prefix));
  };
  expect(f.manager.Allocate("nope", "mine", 1), absl::StatusCode::kNotFound, "session_token");
  expect(f.manager.Allocate("", "mine", 1), absl::StatusCode::kNotFound, "session_token");
  expect(f.manager.Allocate(a.session_token, "", 1), absl::StatusCode::kInvalidArgument,
         "sequence_id");
  expect(f.manager.Allocate(a.session_token, "bad id", 1), absl::StatusCode::kInvalidArgument,
         "sequence_id");
  expect(f.manager.Allocate(a.session_token, std::string(300, 'x'), 1),
         absl::StatusCode::kInvalidArgument, "sequence_id");
  expect(f.manager.Allocate(a.session_token, "mine", 0), absl::StatusCode::kInvalidArgument,
         "num_new_tokens");
  expect(f.manager.Allocate(b.session_token, "mine", 1), absl::StatusCode::kPermissionDenied,
         "sequence_id \"mine\" belongs to another client");
  // 5 tokens + 8 need 4 blocks: 2 more, but 1 is free.
  expect(f.manager.Allocate(a.session_token, "mine", 8), absl::StatusCode::kResourceExhausted,
         "layer 0 needs 2 blocks for num_new_tokens=8 but 1 of 4 are free");
  expect(f.manager.Allocate(a.session_token, "other", 100), absl::StatusCode::kResourceExhausted,
         "more than the whole pool holds");

  const auto after = f.manager.GetSequence("", "mine", true);
  REQUIRE(after.ok());
  CHECK(after->num_positions == before->num_positions);
  for (size_t l = 0; l < after->layers.size(); ++l) {
    CHECK(after->layers[l].block_ids == before->layers[l].block_ids);
    CHECK(after->layers[l].kv_digest == before->layers[l].kv_digest);
  }
  CHECK(f.UsedBlocks() == used);
  CHECK(f.manager.Stats().num_sequences == 2);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("fork shares blocks and the first writer copies the shared tail", "[cpu]") {
  Fixture f;
  AttachResult a = f.Attach();
  auto share = f.manager.ShareFds(a.session_token);
  REQUIRE(share.ok());
  REQUIRE(share->size() == 2);  // the pool region, then the input buffer
  auto region = MemfdRegion::Map(std::move((*share)[0]), a.pool.regions[0].bytes);
  REQUIRE(region.ok());
  const kernels::KvLayerLayout layout = a.pool.model.LayerLayout(a.pool.num_blocks);

  auto parent = *f.manager.Allocate(a.session_token, "p", 6);  // blocks 0, 1 (tail has 2)
  // Write a recognisable pattern into every token of layer 1.
  std::byte* layer1 = region->data() + a.pool.layers[1].offset;
  for (int64_t slot : parent.layers[1].slot_mapping) {
    std::memset(layer1 + layout.slot_offset(kernels::KvPlane::kKey, slot), int(slot) + 1,
                layout.token_bytes());
    std::memset(layer1 + layout.slot_offset(kernels::KvPlane::kValue, slot), int(slot) + 101,
                layout.token_bytes());
  }
  auto child = f.manager.Fork(a.session_token, "p", "c");
  REQUIRE(child.ok());
  CHECK(child->parent_sequence_id == "p");
  CHECK(child->num_positions == 6);
  CHECK(child->layers[1].block_ids == std::vector<uint32_t>{0, 1});
  CHECK(f.UsedBlocks() == 6);
  CHECK(f.manager.Stats().pools[0].layers[0].shared_blocks == 2);
  REQUIRE(f.manager.CheckInvariants().ok());

  auto grow = f.manager.Allocate(a.session_token, "c", 1);
  REQUIRE(grow.ok());
  REQUIRE(grow->layers[1].copies.size() == 1);
  const kernels::BlockCopyPair copy = grow->layers[1].copies[0];
  CHECK(copy.src == 1);
  CHECK(copy.dst == 2);
  CHECK(grow->layers[1].slot_mapping == std::vector<int64_t>{2 * 4 + 2});
  CHECK(grow->layers[1].new_block_ids.empty());
  // The copy carries the parent's tokens 4 and 5.
  for (uint32_t s = 0; s < 2; ++s) {
    const auto* k = layer1 + layout.token_offset(kernels::KvPlane::kKey, 2, s);
    const auto* v = layer1 + layout.token_offset(kernels::KvPlane::kValue, 2, s);
    CHECK(static_cast<int>(k[0]) == 4 + int(s) + 1);
    CHECK(static_cast<int>(v[layout.token_bytes() - 1]) == 4 + int(s) + 101);
  }
  // Now the parent's tail is private again: it appends in place.
  auto parent_grow = f.manager.Allocate(a.session_token, "p", 1);
  REQUIRE(parent_grow.ok());
  CHECK(parent_grow->layers[1].copies.empty());
  CHECK(parent_grow->layers[1].slot_mapping == std::vector<int64_t>{1 * 4 + 2});
  REQUIRE(f.manager.CheckInvariants().ok());

  // The digests differ only where the two sequences diverged.
  auto p_seq = f.manager.GetSequence(a.session_token, "p", true);
  auto c_seq = f.manager.GetSequence(a.session_token, "c", true);
  REQUIRE(p_seq.ok());
  REQUIRE(c_seq.ok());
  const uint32_t c_table[] = {0, 2};
  CHECK(*c_seq->layers[1].kv_digest == kernels::DigestLayerTokens(layout, layer1, c_table, 7));

  // Freeing the parent keeps the shared block 0 alive for the child.
  auto released = f.manager.Free(a.session_token, "p");
  REQUIRE(released.ok());
  CHECK(*released == 3);  // block 1 in each layer; block 0 is still the child's
  CHECK(f.UsedBlocks() == 6);
  REQUIRE(f.manager.Free(a.session_token, "c").ok());
  CHECK(f.UsedBlocks() == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("fork and free errors change nothing", "[cpu]") {
  Fixture f;
  AttachResult a = f.Attach("a");
  AttachResult b = f.Attach("b");
  REQUIRE(f.manager.Allocate(a.session_token, "p", 3).ok());
  REQUIRE(f.manager.Allocate(b.session_token, "q", 3).ok());
  const uint64_t used = f.UsedBlocks();
  CHECK(f.manager.Fork(a.session_token, "p", "q").status().code() ==
        absl::StatusCode::kAlreadyExists);
  CHECK(f.manager.Fork(a.session_token, "q", "z").status().code() ==
        absl::StatusCode::kPermissionDenied);
  CHECK(f.manager.Fork(a.session_token, "missing", "z").status().code() ==
        absl::StatusCode::kNotFound);
  auto bad_child = f.manager.Fork(a.session_token, "p", "");
  CHECK(bad_child.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(bad_child.status().message()), Catch::StartsWith("child_sequence_id"));
  CHECK(f.manager.Fork("bogus", "p", "z").status().code() == absl::StatusCode::kNotFound);
  CHECK(f.manager.Free(b.session_token, "p").status().code() ==
        absl::StatusCode::kPermissionDenied);
  CHECK(f.manager.Free(a.session_token, "missing").status().code() == absl::StatusCode::kNotFound);
  CHECK(f.manager.GetSequence(b.session_token, "p", false).status().code() ==
        absl::StatusCode::kPermissionDenied);
  CHECK(f.UsedBlocks() == used);
  CHECK(f.manager.Stats().num_sequences == 2);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("leases: silence expires a client and returns its blocks", "[cpu]") {
  CacheManagerOptions options;
  options.lease_timeout = absl::Seconds(10);
  Fixture f(options);
  AttachResult a = f.Attach("a");
  AttachResult b = f.Attach("b");
  REQUIRE(f.manager.Allocate(a.session_token, "sa", 9).ok());
  REQUIRE(f.manager.Allocate(b.session_token, "sb", 5).ok());
  REQUIRE(f.manager.Fork(a.session_token, "sa", "sa2").ok());

  f.clock.Advance(absl::Seconds(6));
  auto left = f.manager.Heartbeat(b.session_token);
  REQUIRE(left.ok());
  CHECK(*left == absl::Seconds(10));
  CHECK(f.manager.ExpireLeases().empty());

  f.clock.Advance(absl::Seconds(5));  // a: 11 s silent, b: 5 s
  CHECK(f.manager.ExpireLeases() == std::vector<std::string>{a.client_id});
  CHECK(f.UsedBlocks() == 2 * 3);
  CHECK(f.manager.Stats().num_sequences == 1);
  CHECK(f.manager.Heartbeat(a.session_token).status().code() == absl::StatusCode::kNotFound);
  REQUIRE(f.manager.CheckInvariants().ok());

  // A call after the deadline but before the reaper ran also finds the lease gone.
  f.clock.Advance(absl::Seconds(11));
  auto late = f.manager.Allocate(b.session_token, "sb", 1);
  REQUIRE(late.status().code() == absl::StatusCode::kNotFound);
  CHECK_THAT(std::string(late.status().message()), Catch::Contains("lease expired"));
  REQUIRE(f.manager.CheckInvariants().ok());
  // The pool stays while b's blocks are quarantined, and goes when the reaper ends it.
  CHECK(f.manager.Stats().pools.size() == 1);
  f.clock.Advance(f.manager.quarantine());
  f.manager.ExpireLeases();
  CHECK(f.manager.Stats().pools.empty());
  CHECK(f.manager.Stats().memory_used_bytes == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
  bool saw_expired = false;
  for (const Event& e : f.events) {
    saw_expired |= e.type == EventType::kClientExpired && e.client_id == a.client_id;
  }
  CHECK(saw_expired);
}

TEST_CASE("detach frees everything and releases the pool with its last client", "[cpu]") {
  Fixture f;
  AttachResult a = f.Attach("a");
  REQUIRE(f.manager.Allocate(a.session_token, "s1", 5).ok());
  REQUIRE(f.manager.Allocate(a.session_token, "s2", 1).ok());
  auto r = f.manager.Detach(a.session_token);
  REQUIRE(r.ok());
  CHECK(r->sequences_freed == 2);
  CHECK(r->blocks_released == 9);
  CHECK(f.manager.Stats().pools.empty());
  CHECK(f.manager.Detach(a.session_token).status().code() == absl::StatusCode::kNotFound);
  REQUIRE(f.manager.CheckInvariants().ok());
  std::vector<EventType> types;
  for (const Event& e : f.events) types.push_back(e.type);
  CHECK(types == std::vector<EventType>{EventType::kPoolCreated, EventType::kClientAttached,
                                        EventType::kSequenceAllocated,
                                        EventType::kSequenceAllocated, EventType::kClientDetached,
                                        EventType::kPoolReleased});
}

TEST_CASE("list sequences: own by token, all without", "[cpu]") {
  Fixture f;
  AttachResult a = f.Attach("a");
  AttachResult b = f.Attach("b");
  REQUIRE(f.manager.Allocate(a.session_token, "z", 5).ok());
  REQUIRE(f.manager.Allocate(b.session_token, "y", 1).ok());
  auto mine = f.manager.ListSequences(a.session_token);
  REQUIRE(mine.ok());
  REQUIRE(mine->size() == 1);
  CHECK((*mine)[0].sequence_id == "z");
  CHECK((*mine)[0].num_blocks == 6);
  CHECK((*mine)[0].owner_client_name == "a");
  auto all = f.manager.ListSequences("");
  REQUIRE(all.ok());
  REQUIRE(all->size() == 2);
  CHECK((*all)[0].sequence_id == "y");
  CHECK(f.manager.ListSequences("bogus").status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("random workload across clients keeps every invariant", "[cpu]") {
  Fixture f;
  std::vector<AttachResult> clients = {f.Attach("a", 24), f.Attach("b"), f.Attach("c")};
  std::mt19937 rng(11);
  std::vector<std::pair<size_t, std::string>> live;  // (client index, sequence id)
  int next_id = 0;
  for (int step = 0; step < 2000; ++step) {
    const size_t ci = rng() % clients.size();
    const std::string& token = clients[ci].session_token;
    const int op = rng() % 4;
    if (op == 0 || live.empty()) {
      const std::string id = "s" + std::to_string(next_id++);
      if (f.manager.Allocate(token, id, 1 + rng() % 9).ok()) live.emplace_back(ci, id);
    } else if (op == 1) {
      auto& [owner, id] = live[rng() % live.size()];
      auto r = f.manager.Allocate(clients[owner].session_token, id, 1 + rng() % 5);
      if (!r.ok()) CHECK(r.status().code() == absl::StatusCode::kResourceExhausted);
    } else if (op == 2) {
      auto [owner, id] = live[rng() % live.size()];
      const std::string child = "s" + std::to_string(next_id++);
      if (f.manager.Fork(clients[owner].session_token, id, child).ok()) {
        live.emplace_back(owner, child);
      }
    } else {
      const size_t i = rng() % live.size();
      REQUIRE(f.manager.Free(clients[live[i].first].session_token, live[i].second).ok());
      live.erase(live.begin() + i);
    }
    REQUIRE(f.manager.CheckInvariants().ok());
  }
  for (const auto& c : clients) REQUIRE(f.manager.Detach(c.session_token).ok());
  CHECK(f.manager.Stats().pools.empty());
  REQUIRE(f.manager.CheckInvariants().ok());
}

}  // namespace
}  // namespace cachemgr
