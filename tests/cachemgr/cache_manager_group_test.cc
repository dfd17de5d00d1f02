// Tensor-parallel groups (AttachParams::group): each rank's session maps its shard of the KV
// heads, the group shares one block table per layer, and Compress / Fetch over a group decide
// and produce exactly what they do for the unsharded model. An unsharded client of the same
// model in the same manager is the reference.
#include <catch2/catch.hpp>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "cachemgr/backend/host_backend.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/kernels/elem_convert.h"
#include "cachemgr/util/clock.h"

namespace cachemgr {
namespace {

constexpr uint32_t kLayers = 3, kQHeads = 8, kKvHeads = 4, kDim = 8, kBlock = 4, kTokens = 40;
constexpr uint32_t kBlocks = 64, kQueries = 4;

ModelSpec TpModel(DType dtype = DType::kFp32) {
  ModelSpec m;
  m.name = "tp";
  m.num_layers = kLayers;
  m.num_q_heads = kQHeads;
  m.num_kv_heads = kKvHeads;
  m.head_dim = kDim;
  m.dtype = dtype;
  m.block_size = kBlock;
  return m;
}

// A session with its pool shard and input buffer mapped, as an engine's rank maps them.
struct Rank {
  AttachResult a;
  MemfdRegion pool, input;
  kernels::KvLayerLayout layout;
  const std::string& token() const { return a.session_token; }
  // Heads this session holds: [first_head, first_head + layout.num_kv_heads).
  uint32_t first_head() const { return a.pool.group_rank * layout.num_kv_heads; }
  std::byte* Head(uint32_t l, kernels::KvPlane plane, int64_t slot, uint32_t h) {
    return pool.data() + a.pool.layers[l].offset +
           layout.head_offset(plane, static_cast<uint32_t>(slot / kBlock),
                              static_cast<uint32_t>(slot % kBlock), h);
  }
};

absl::StatusOr<AttachResult> AttachAs(CacheManager& m, const std::string& name,
                                      std::optional<GroupMembership> group,
                                      DType dtype = DType::kFp32) {
  AttachParams p;
  p.client_name = name;
  p.model = TpModel(dtype);
  p.num_blocks = kBlocks;
  p.group = std::move(group);
  return m.Attach(p);
}

Rank Map(CacheManager& m, AttachResult a) {
  Rank r;
  r.a = std::move(a);
  auto fds = m.ShareFds(r.a.session_token);
  REQUIRE(fds.ok());
  REQUIRE(fds->size() == 2);  // its shard's region, its input buffer
  r.pool = *MemfdRegion::Map(std::move((*fds)[0]), r.a.pool.regions[0].bytes);
  r.input = *MemfdRegion::Map(std::move((*fds)[1]), r.a.input_buffer_bytes);
  r.layout = r.a.pool.model.LayerLayout(r.a.pool.num_blocks);
  return r;
}

// The whole model's KV and window queries, written by an unsharded session or split over a
// group's ranks.
struct SequenceData {
  explicit SequenceData(uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    keys.assign(kLayers, std::vector<float>(kTokens * kKvHeads * kDim));
    values = keys;
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (uint32_t t = 0; t < kTokens; ++t) {
        for (uint32_t h = 0; h < kKvHeads; ++h) {
          for (uint32_t d = 0; d < kDim; ++d) {
            // Tokens of a head share a direction, so codebooks merge some of them.
            const float base = (t % 3 == 0 ? 1.0f : 0.2f) * static_cast<float>(d + h + 1);
            keys[l][(t * kKvHeads + h) * kDim + d] = base + 0.05f * normal(rng);
            values[l][(t * kKvHeads + h) * kDim + d] = base - 0.05f * normal(rng);
          }
        }
      }
    }
    queries.resize(size_t{kLayers} * kQueries * kQHeads * kDim);
    for (float& q : queries) q = normal(rng);
  }

  // Writes the heads `session` holds of every row of `id` (allocated by then) and its share of
  // the window queries ([L, num_queries, its q heads, D]).
  void Write(CacheManager& m, Rank& session, const std::string& id) const {
    auto snap = m.GetSequence(session.token(), id, false);
    REQUIRE(snap.ok());
    const uint32_t hkv = session.layout.num_kv_heads;
    const uint32_t hq = session.a.pool.model.num_q_heads;
    const uint32_t elem = session.layout.elem_bytes;
    const bool bf16 = session.a.pool.model.dtype == DType::kBf16;
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (uint32_t t = 0; t < kTokens; ++t) {
        const int64_t slot = int64_t{snap->layers[l].block_ids[t / kBlock]} * kBlock + t % kBlock;
        for (uint32_t h = 0; h < hkv; ++h) {
          const size_t at = (size_t{t} * kKvHeads + session.first_head() + h) * kDim;
          kernels::FromF32(keys[l].data() + at, elem, bf16, kDim,
                           session.Head(l, kernels::KvPlane::kKey, slot, h));
          kernels::FromF32(values[l].data() + at, elem, bf16, kDim,
                           session.Head(l, kernels::KvPlane::kValue, slot, h));
        }
      }
    }
    const uint32_t first_q = session.a.pool.group_rank * hq;
    float* out = reinterpret_cast<float*>(session.input.data());
    for (uint32_t lq = 0; lq < kLayers * kQueries; ++lq) {
      for (uint32_t j = 0; j < hq; ++j) {
        std::memcpy(out + (size_t{lq} * hq + j) * kDim,
                    queries.data() + (size_t{lq} * kQHeads + first_q + j) * kDim, kDim * 4);
      }
    }
  }

  std::vector<std::vector<float>> keys, values;  // [L][n, Hkv, D]
  std::vector<float> queries;                    // [L, num_queries, Hq, D]
};

struct Manager {
  Manager() : manager(Options(), &backend, &clock, nullptr) {}
  static CacheManagerOptions Options() {
    CacheManagerOptions o;
    o.compress_threads = 2;
    return o;
  }
  HostBackend backend;
  FakeClock clock;
  CacheManager manager;
};

std::vector<uint64_t> Digests(CacheManager& m, const std::string& token, const std::string& id) {
  auto snap = m.GetSequence(token, id, /*include_kv_digest=*/true);
  REQUIRE(snap.ok());
  std::vector<uint64_t> out;
  for (const auto& l : snap->layers) out.push_back(l.kv_digest.value());
  return out;
}

// Every rank's mapping holds its heads of the unsharded session's rows, byte for byte, in the
// rows the block tables name (resident layers).
void CheckShardsHoldRows(CacheManager& m, Rank& whole, const std::string& whole_id,
                         std::vector<Rank*> ranks, const std::string& group_id) {
  auto w = m.GetSequence(whole.token(), whole_id, false);
  auto g = m.GetSequence(ranks[0]->token(), group_id, false);
  REQUIRE(w.ok());
  REQUIRE(g.ok());
  const size_t head_bytes = whole.layout.head_bytes();
  for (uint32_t l = 0; l < kLayers; ++l) {
    if (w->layers[l].parked) continue;
    REQUIRE(w->layers[l].num_tokens == g->layers[l].num_tokens);
    for (uint32_t t = 0; t < w->layers[l].num_tokens; ++t) {
      const int64_t ws = int64_t{w->layers[l].block_ids[t / kBlock]} * kBlock + t % kBlock;
      const int64_t gs = int64_t{g->layers[l].block_ids[t / kBlock]} * kBlock + t % kBlock;
      for (Rank* r : ranks) {
        for (uint32_t h = 0; h < r->layout.num_kv_heads; ++h) {
          for (kernels::KvPlane p : {kernels::KvPlane::kKey, kernels::KvPlane::kValue}) {
            INFO("layer " << l << " row " << t << " rank " << r->a.pool.group_rank << " head "
                          << h);
            CHECK(std::memcmp(r->Head(l, p, gs, h), whole.Head(l, p, ws, r->first_head() + h),
                              head_bytes) == 0);
          }
        }
      }
    }
  }
}

CompressParams WindowParams(const std::string& preset, compress::TargetKind kind, double value) {
  CompressParams p;
  p.policy = *ResolvePreset(preset);
  p.policy.window = kQueries;
  p.target = {kind, value};
  p.input = CompressInput::kWindowQueries;
  p.num_queries = kQueries;
  return p;
}

void CheckSameResult(const CompressResult& g, const CompressResult& w) {
  REQUIRE(g.layers.size() == w.layers.size());
  for (size_t l = 0; l < g.layers.size(); ++l) {
    INFO("layer " << l);
    CHECK(g.layers[l].kept_per_head == w.layers[l].kept_per_head);
    CHECK(g.layers[l].num_tokens == w.layers[l].num_tokens);
    CHECK(g.layers[l].kept_positions == w.layers[l].kept_positions);
    CHECK(g.layers[l].codebook == w.layers[l].codebook);
    CHECK(g.layers[l].key_codebook_size == w.layers[l].key_codebook_size);
    CHECK(g.layers[l].value_codebook_size == w.layers[l].value_codebook_size);
    CHECK(g.layers[l].bytes_held == w.layers[l].bytes_held);
    CHECK(g.layers[l].context_ratio == w.layers[l].context_ratio);
  }
  CHECK(g.bytes_before == w.bytes_before);
  CHECK(g.bytes_after == w.bytes_after);
  CHECK(g.honest_ratio == w.honest_ratio);
  CHECK(g.blocks_released == w.blocks_released);
}

struct GroupCase {
  const char* preset;
  compress::TargetKind kind;
  double value;
  uint32_t size;
  DType dtype;
};

TEST_CASE("Compress and Fetch over a group equal the unsharded model's", "[cpu]") {
  const GroupCase c =
      GENERATE(GroupCase{"snapkv", compress::TargetKind::kReserveRatio, 0.3, 2, DType::kFp32},
               GroupCase{"pyramidkv", compress::TargetKind::kReserveRatio, 0.4, 4, DType::kFp32},
               GroupCase{"h2o", compress::TargetKind::kReserveRatio, 0.5, 2, DType::kBf16},
               GroupCase{"zigzagkv", compress::TargetKind::kByteRatio, 0.4, 2, DType::kFp16},
               GroupCase{"spindlekv", compress::TargetKind::kByteRatio, 0.2, 2, DType::kFp32},
               GroupCase{"spindlekv", compress::TargetKind::kByteRatio, 0.25, 4, DType::kBf16},
               GroupCase{"codebook", compress::TargetKind::kByteRatio, 0.3135, 2, DType::kFp32});
  INFO(c.preset << " size " << c.size << " dtype " << DTypeName(c.dtype));
  Manager m;
  Rank whole = Map(m.manager, *AttachAs(m.manager, "whole", std::nullopt, c.dtype));
  std::vector<Rank> ranks;
  for (uint32_t r = 0; r < c.size; ++r) {
    auto a =
        AttachAs(m.manager, "rank" + std::to_string(r), GroupMembership{"g", r, c.size}, c.dtype);
    REQUIRE(a.ok());
    CHECK(a->pool.group_size == c.size);
    CHECK(a->pool.group_rank == r);
    CHECK(a->pool.model.num_kv_heads == kKvHeads / c.size);
    CHECK(a->pool.model.num_q_heads == kQHeads / c.size);
    CHECK(a->pool.pool_id != whole.a.pool.pool_id);
    CHECK(a->input_buffer_bytes == uint64_t{kLayers} * 64 * (kQHeads / c.size) * kDim * 4);
    ranks.push_back(Map(m.manager, *a));
  }
  // Every rank maps the same pool: one block table for all.
  for (const Rank& r : ranks) CHECK(r.a.pool.pool_id == ranks[0].a.pool.pool_id);

  const SequenceData data(11);
  REQUIRE(m.manager.Allocate(whole.token(), "w", kTokens).ok());
  // Rank 0 allocates (as a scheduler would); every rank writes its heads.
  REQUIRE(m.manager.Allocate(ranks[0].token(), "g", kTokens).ok());
  data.Write(m.manager, whole, "w");
  for (Rank& r : ranks) data.Write(m.manager, r, "g");
  CHECK(Digests(m.manager, ranks[0].token(), "g") == Digests(m.manager, whole.token(), "w"));

  const CompressParams params = WindowParams(c.preset, c.kind, c.value);
  auto w = m.manager.Compress(whole.token(), "w", params);
  INFO(w.status());
  REQUIRE(w.ok());
  // Any rank may ask; the last one does here.
  auto g = m.manager.Compress(ranks.back().token(), "g", params);
  REQUIRE(g.ok());
  CheckSameResult(*g, *w);
  CHECK(Digests(m.manager, ranks[0].token(), "g") == Digests(m.manager, whole.token(), "w"));
  std::vector<Rank*> rank_ptrs;
  for (Rank& r : ranks) rank_ptrs.push_back(&r);
  CheckShardsHoldRows(m.manager, whole, "w", rank_ptrs, "g");

  auto fw = m.manager.Fetch(whole.token(), "w", {});
  auto fg = m.manager.Fetch(ranks[0].token(), "g", {});
  REQUIRE(fw.ok());
  REQUIRE(fg.ok());
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK((*fg)[l].positions == (*fw)[l].positions);
    CHECK((*fg)[l].new_blocks == (*fw)[l].new_blocks);
  }
  CHECK(Digests(m.manager, ranks[0].token(), "g") == Digests(m.manager, whole.token(), "w"));
  CheckShardsHoldRows(m.manager, whole, "w", rank_ptrs, "g");
  REQUIRE(m.manager.CheckInvariants().ok());
}

TEST_CASE("Scores as input are read from every rank's buffer", "[cpu]") {
  Manager m;
  Rank whole = Map(m.manager, *AttachAs(m.manager, "whole", std::nullopt));
  Rank r0 = Map(m.manager, *AttachAs(m.manager, "r0", GroupMembership{"g", 0, 2}));
  Rank r1 = Map(m.manager, *AttachAs(m.manager, "r1", GroupMembership{"g", 1, 2}));
  const SequenceData data(5);
  REQUIRE(m.manager.Allocate(whole.token(), "w", kTokens).ok());
  REQUIRE(m.manager.Allocate(r1.token(), "g", kTokens).ok());
  data.Write(m.manager, whole, "w");
  data.Write(m.manager, r0, "g");
  data.Write(m.manager, r1, "g");
  // Scores [L, Hq, n]: the whole model's, and each rank's [L, Hq / 2, n].
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uni;
  std::vector<float> scores(size_t{kLayers} * kQHeads * kTokens);
  for (float& s : scores) s = uni(rng);
  std::memcpy(whole.input.data(), scores.data(), scores.size() * 4);
  for (Rank* r : {&r0, &r1}) {
    const uint32_t hq = kQHeads / 2, first = r->a.pool.group_rank * hq;
    for (uint32_t l = 0; l < kLayers; ++l) {
      std::memcpy(r->input.data() + (size_t{l} * hq) * kTokens * 4,
                  scores.data() + (size_t{l} * kQHeads + first) * kTokens,
                  size_t{hq} * kTokens * 4);
    }
  }
  CompressParams p = WindowParams("snapkv", compress::TargetKind::kReserveRatio, 0.3);
  p.input = CompressInput::kScores;
  auto w = m.manager.Compress(whole.token(), "w", p);
  auto g = m.manager.Compress(r0.token(), "g", p);
  REQUIRE(w.ok());
  REQUIRE(g.ok());
  CheckSameResult(*g, *w);
  CheckShardsHoldRows(m.manager, whole, "w", {&r0, &r1}, "g");
}

TEST_CASE("A group's members share its sequences; nobody else does", "[cpu]") {
  Manager m;
  Rank r0 = Map(m.manager, *AttachAs(m.manager, "r0", GroupMembership{"g", 0, 2}));
  Rank r1 = Map(m.manager, *AttachAs(m.manager, "r1", GroupMembership{"g", 1, 2}));
  auto other = AttachAs(m.manager, "other", std::nullopt);
  REQUIRE(other.ok());
  REQUIRE(m.manager.Allocate(r0.token(), "s", 9).ok());
  // Rank 1 sees, grows, forks and lists rank 0's sequence: one block table for the group.
  auto grown = m.manager.Allocate(r1.token(), "s", 3);
  INFO(grown.status());
  REQUIRE(grown.ok());
  CHECK(grown->first_position == 9);
  REQUIRE(m.manager.Fork(r1.token(), "s", "child").ok());
  auto listed = m.manager.ListSequences(r1.token());
  REQUIRE(listed.ok());
  REQUIRE(listed->size() == 2);
  CHECK(m.manager.GetSequence(r0.token(), "child", false)->num_positions == 12);
  // The same owner's client outside the group: PERMISSION_DENIED, as for any other client.
  CHECK(m.manager.GetSequence(other->session_token, "s", false).status().code() ==
        absl::StatusCode::kPermissionDenied);
  CHECK(m.manager.ListSequences(other->session_token)->empty());
  CHECK(m.manager.Free(r1.token(), "child").ok());
  REQUIRE(m.manager.CheckInvariants().ok());

  // One allocator for the group; every rank's memory charged.
  const StatsSnapshot stats = m.manager.Stats();
  REQUIRE(stats.pools.size() == 2);
  const PoolSnapshot& gp =
      stats.pools[0].pool_id == r0.a.pool.pool_id ? stats.pools[0] : stats.pools[1];
  CHECK(gp.group_name == "g");
  CHECK(gp.group_size == 2);
  CHECK(gp.group_ranks_attached == 2);
  CHECK(gp.bytes == r0.a.pool.regions[0].bytes + r1.a.pool.regions[0].bytes);
  CHECK(gp.layers[0].used_blocks == 3);  // 12 tokens, 4 a block
  CHECK(gp.clients == 2);

  // Detaching the rank that created "s" frees it for the group.
  REQUIRE(m.manager.Detach(r0.token()).ok());
  CHECK(m.manager.GetSequence(r1.token(), "s", false).status().code() ==
        absl::StatusCode::kNotFound);
  // Its rank can be taken again.
  CHECK(AttachAs(m.manager, "r0-again", GroupMembership{"g", 0, 2}).ok());
  REQUIRE(m.manager.CheckInvariants().ok());
}

TEST_CASE("Copy on write copies every rank's shard", "[cpu]") {
  Manager m;
  Rank r0 = Map(m.manager, *AttachAs(m.manager, "r0", GroupMembership{"g", 0, 2}));
  Rank r1 = Map(m.manager, *AttachAs(m.manager, "r1", GroupMembership{"g", 1, 2}));
  const SequenceData data(9);
  REQUIRE(m.manager.Allocate(r0.token(), "s", kTokens - 2).ok());  // a partial tail block
  for (Rank* r : {&r0, &r1}) {
    // Write what fits (the data covers kTokens rows; the sequence holds kTokens - 2).
    auto snap = m.manager.GetSequence(r->token(), "s", false);
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (uint32_t t = 0; t < kTokens - 2; ++t) {
        const int64_t slot = int64_t{snap->layers[l].block_ids[t / kBlock]} * kBlock + t % kBlock;
        for (uint32_t h = 0; h < r->layout.num_kv_heads; ++h) {
          std::memcpy(r->Head(l, kernels::KvPlane::kKey, slot, h),
                      data.keys[l].data() + (size_t{t} * kKvHeads + r->first_head() + h) * kDim,
                      kDim * 4);
        }
      }
    }
  }
  REQUIRE(m.manager.Fork(r0.token(), "s", "f").ok());
  const std::vector<uint64_t> before = Digests(m.manager, r0.token(), "s");
  auto grown = m.manager.Allocate(r1.token(), "f", 1);
  REQUIRE(grown.ok());
  REQUIRE(grown->layers[0].copies.size() == 1);
  // The fork's private tail holds the shared rows on both ranks: the fork's first kTokens - 2
  // rows digest like the parent's.
  auto f = m.manager.GetSequence(r0.token(), "f", false);
  for (Rank* r : {&r0, &r1}) {
    const auto& copy = grown->layers[0].copies[0];
    for (uint32_t row = 0; row < (kTokens - 2) % kBlock; ++row) {
      for (uint32_t h = 0; h < r->layout.num_kv_heads; ++h) {
        CHECK(std::memcmp(r->Head(0, kernels::KvPlane::kKey, int64_t{copy.dst} * kBlock + row, h),
                          r->Head(0, kernels::KvPlane::kKey, int64_t{copy.src} * kBlock + row, h),
                          kDim * 4) == 0);
      }
    }
  }
  CHECK(f->layers[0].block_ids.back() == grown->layers[0].copies[0].dst);
  CHECK(Digests(m.manager, r0.token(), "s") == before);
  REQUIRE(m.manager.CheckInvariants().ok());
}

TEST_CASE("Group attach errors name the field and change nothing", "[cpu]") {
  Manager m;
  REQUIRE(AttachAs(m.manager, "r0", GroupMembership{"g", 0, 2}).ok());
  const StatsSnapshot before = m.manager.Stats();
  struct Bad {
    GroupMembership group;
    absl::StatusCode code;
    const char* field;
  };
  for (const Bad& bad : {
           Bad{{"g", 0, 2}, absl::StatusCode::kAlreadyExists, "group.rank 0"},
           Bad{{"g", 1, 4}, absl::StatusCode::kFailedPrecondition, "group.size 4"},
           Bad{{"g", 2, 2}, absl::StatusCode::kInvalidArgument, "group.rank"},
           Bad{{"g", 0, 3}, absl::StatusCode::kInvalidArgument, "group.size 3 must divide"},
           Bad{{"g", 0, 0}, absl::StatusCode::kInvalidArgument, "group.size"},
           Bad{{"g", 0, 65}, absl::StatusCode::kInvalidArgument, "group.size"},
           Bad{{"", 0, 2}, absl::StatusCode::kInvalidArgument, "group.name"},
           Bad{{"a b", 0, 2}, absl::StatusCode::kInvalidArgument, "group.name"},
       }) {
    auto r = AttachAs(m.manager, "bad", bad.group);
    INFO(r.status());
    CHECK(r.status().code() == bad.code);
    CHECK(absl::StrContains(r.status().message(), bad.field));
  }
  const StatsSnapshot after = m.manager.Stats();
  CHECK(after.clients.size() == before.clients.size());
  CHECK(after.pools.size() == before.pools.size());
  CHECK(after.memory_used_bytes == before.memory_used_bytes);
  // A group of one is no group: the plain pool of the model.
  auto plain = AttachAs(m.manager, "plain", std::nullopt);
  auto one = AttachAs(m.manager, "one", GroupMembership{"solo", 0, 1});
  REQUIRE(one.ok());
  CHECK(one->pool.pool_id == plain->pool.pool_id);
  CHECK(one->pool.group_size == 1);
  REQUIRE(m.manager.CheckInvariants().ok());
}

TEST_CASE("Compress with inputs needs every rank attached", "[cpu]") {
  Manager m;
  Rank r0 = Map(m.manager, *AttachAs(m.manager, "r0", GroupMembership{"g", 0, 2}));
  auto r1 = AttachAs(m.manager, "r1", GroupMembership{"g", 1, 2});
  REQUIRE(m.manager.Allocate(r0.token(), "s", kTokens).ok());
  REQUIRE(m.manager.Detach(r1->session_token).ok());
  auto r = m.manager.Compress(r0.token(), "s",
                              WindowParams("snapkv", compress::TargetKind::kReserveRatio, 0.5));
  CHECK(r.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(absl::StrContains(r.status().message(), "group.rank 1"));
  CHECK_FALSE(m.manager.GetSequence(r0.token(), "s", false)->compressed);
  // Without inputs (StreamingLLM), the ranks present suffice: the daemon holds every shard.
  CompressParams p = WindowParams("streamingllm", compress::TargetKind::kReserveRatio, 0.5);
  p.input = CompressInput::kNone;
  CHECK(m.manager.Compress(r0.token(), "s", p).ok());
  REQUIRE(m.manager.CheckInvariants().ok());
}

TEST_CASE("A group's sequence transfers to an unsharded pool with equal digests", "[cpu]") {
  Manager tp, single;
  Rank r0 = Map(tp.manager, *AttachAs(tp.manager, "r0", GroupMembership{"g", 0, 2}));
  Rank r1 = Map(tp.manager, *AttachAs(tp.manager, "r1", GroupMembership{"g", 1, 2}));
  Rank one = Map(single.manager, *AttachAs(single.manager, "one", std::nullopt));
  const SequenceData data(21);
  const CompressParams params = WindowParams("snapkv", compress::TargetKind::kReserveRatio, 0.5);
  REQUIRE(tp.manager.Allocate(r0.token(), "s", kTokens).ok());
  data.Write(tp.manager, r0, "s");
  data.Write(tp.manager, r1, "s");
  REQUIRE(tp.manager.Compress(r0.token(), "s", params).ok());
  // The reference: the same rows compressed in the unsharded pool.
  REQUIRE(single.manager.Allocate(one.token(), "ref", kTokens).ok());
  data.Write(single.manager, one, "ref");
  REQUIRE(single.manager.Compress(one.token(), "ref", params).ok());
  auto out = tp.manager.BeginExport(r1.token(), "s");
  REQUIRE(out.ok());
  CHECK(out->header.num_kv_heads == kKvHeads);  // the whole model travels
  auto in = single.manager.BeginImport(one.token(), "t", out->header);
  REQUIRE(in.ok());
  for (uint32_t l = 0; l < kLayers; ++l) {
    const uint32_t rows = out->header.layers[l].num_tokens;
    std::string k, v;
    REQUIRE(out->ReadRows(l, 0, rows, &k, &v).ok());
    REQUIRE(in->WriteRows(l, 0, rows, k, v).ok());
    CHECK(*in->DigestRows(l) == *out->DigestRows(l));
  }
  REQUIRE(single.manager.CommitImport(*in).ok());
  tp.manager.EndExport(*out, /*release=*/true);
  CHECK(Digests(single.manager, one.token(), "t") == Digests(single.manager, one.token(), "ref"));
  CHECK(tp.manager.GetSequence(r0.token(), "s", false).status().code() ==
        absl::StatusCode::kNotFound);
  REQUIRE(tp.manager.CheckInvariants().ok());
  REQUIRE(single.manager.CheckInvariants().ok());
}

}  // namespace
}  // namespace cachemgr
