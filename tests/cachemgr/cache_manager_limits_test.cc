// CacheManager against hostile sizes: pools whose products overflow, the memory budget with page
// rounding, bookkeeping and input buffers, replies too large to send, and messages that would
// echo megabytes of client input. Every refusal names the field and changes nothing.
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "cachemgr/backend/host_backend.h"
#include "cachemgr/cache_manager.h"

namespace cachemgr {
namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;

ModelSpec Model(const std::string& name, uint32_t layers, uint32_t kv_heads, uint32_t head_dim,
                DType dtype, uint32_t block_size) {
  ModelSpec m;
  m.name = name;
  m.num_layers = layers;
  m.num_q_heads = kv_heads;
  m.num_kv_heads = kv_heads;
  m.head_dim = head_dim;
  m.dtype = dtype;
  m.block_size = block_size;
  return m;
}

ModelSpec Small(const std::string& name = "small") {
  return Model(name, 2, 2, 8, DType::kFp16, 16);
}

struct Fixture {
  explicit Fixture(CacheManagerOptions options = {})
      : manager(options, &backend, &clock, nullptr) {}

  uint64_t UsedBlocks() {
    uint64_t used = 0;
    for (const auto& p : manager.Stats().pools) {
      for (const auto& l : p.layers) used += l.used_blocks;
    }
    return used;
  }

  HostBackend backend;
  FakeClock clock;
  CacheManager manager;
};

// A normal client still works: attach, allocate, digest the KV.
void CheckServes(CacheManager& manager) {
  auto a = manager.Attach({"normal", Small("normal"), 8});
  REQUIRE(a.ok());
  REQUIRE(manager.Allocate(a->session_token, "s", 20).ok());
  auto seq = manager.GetSequence(a->session_token, "s", /*include_kv_digest=*/true);
  REQUIRE(seq.ok());
  CHECK(seq->layers[1].kv_digest.has_value());
  REQUIRE(manager.Detach(a->session_token).ok());
}

TEST_CASE("the issue's Attach is refused naming num_blocks and changes nothing", "[cpu]") {
  Fixture f;
  ModelSpec m = Model("wrap", 290, 4013, 1018, DType::kFp32, 1013);
  m.num_q_heads = 4013;
  // A small input buffer of its own (the default, 64 queries of every layer, is refused).
  auto r = f.manager.Attach({"attacker", m, 1921345, 4096});
  REQUIRE(r.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(r.status().message()), Catch::StartsWith("num_blocks 1921345"));
  CHECK(f.manager.Stats().pools.empty());
  CHECK(f.manager.Stats().memory_used_bytes == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
  CheckServes(f.manager);
}

TEST_CASE(
    "pool sizes at the edge of 64-bit offsets: just below is a budget question, just "
    "above is invalid",
    "[cpu]") {
  CacheManagerOptions options;
  options.memory_budget_bytes = UINT64_MAX;
  Fixture f(options);
  // Every field at its maximum: 2^35 bytes per block per layer, 2^45 over 1024 layers, so
  // 2^18 blocks make exactly 2^63 bytes, one more than an off_t holds.
  const ModelSpec max =
      Model("max", kMaxLayers, kMaxHeads, kMaxHeadDim, DType::kFp32, kMaxBlockSize);
  auto above = f.manager.Attach({"x", max, uint32_t{1} << 18, 4096});
  REQUIRE(above.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(above.status().message()), Catch::StartsWith("num_blocks 262144"));
  // One block less fits the arithmetic; the kernel then refuses 2^63 - 2^45 bytes of memfd.
  auto below = f.manager.Attach({"x", max, (uint32_t{1} << 18) - 1, 4096});
  CHECK(below.status().code() != absl::StatusCode::kInvalidArgument);
  CHECK_FALSE(below.ok());
  auto largest = f.manager.Attach({"x", max, UINT32_MAX / kMaxBlockSize, 4096});
  REQUIRE(largest.status().code() == absl::StatusCode::kInvalidArgument);
  auto beyond = f.manager.Attach({"x", max, UINT32_MAX / kMaxBlockSize + 1, 4096});
  REQUIRE(beyond.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(beyond.status().message()), Catch::StartsWith("num_blocks must be"));
  CHECK(f.manager.Stats().pools.empty());
  CHECK(f.manager.Stats().memory_used_bytes == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("page rounding and bookkeeping count: the crafted pool cannot pass the budget", "[cpu]") {
  CacheManagerOptions options;
  options.memory_budget_bytes = kGiB;
  Fixture f(options);
  // 128-byte blocks: 3 * 128 * 2796202 = 1 GiB - 256 before rounding each layer to pages, and
  // 8 bytes of allocator state per block and layer beside it.
  const ModelSpec tiny = Model("tiny", 3, 1, 2, DType::kFp16, 16);
  auto crafted = f.manager.Attach({"a", tiny, 2796202});
  REQUIRE(crafted.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(crafted.status().message()), Catch::StartsWith("num_blocks 2796202"));
  CHECK_THAT(std::string(crafted.status().message()), Catch::Contains("bookkeeping"));
  CHECK(f.manager.Stats().memory_used_bytes == 0);

  // A default-sized pool of such blocks stays within the budget, bookkeeping included...
  auto fits = f.manager.Attach({"a", tiny, 0});
  REQUIRE(fits.ok());
  const StatsSnapshot stats = f.manager.Stats();
  CHECK(stats.memory_used_bytes <= kGiB);
  CHECK(stats.pools[0].bookkeeping_bytes ==
        uint64_t{fits->pool.num_blocks} * 3 * kBookkeepingBytesPerBlockLayer);
  CHECK(stats.memory_used_bytes ==
        stats.pools[0].bytes + stats.pools[0].bookkeeping_bytes + stats.input_buffer_bytes);
  REQUIRE(f.manager.CheckInvariants().ok());
  // ... and what is left never wraps into room for more.
  for (const uint64_t gib : {16, 64}) {
    const ModelSpec big = Model(absl::StrCat("big", gib), 1, 8, 128, DType::kFp16, 16);
    auto r = f.manager.Attach({"b", big, static_cast<uint32_t>(gib * kGiB / big.BlockBytes())});
    INFO(gib << " GiB");
    REQUIRE(r.status().code() == absl::StatusCode::kResourceExhausted);
  }
  CHECK(f.manager.Stats().memory_used_bytes <= kGiB);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("input buffers are charged to the budget and released with their client", "[cpu]") {
  CacheManagerOptions options;
  options.memory_budget_bytes = 1 << 20;
  options.default_pool_bytes = 1 << 20;
  Fixture f(options);
  auto a = f.manager.Attach({"a", Small(), 32});
  REQUIRE(a.ok());
  const uint64_t used = f.manager.Stats().memory_used_bytes;
  // A second client asking for more input buffer than is left is refused, naming the field.
  AttachParams greedy{"b", Small(), 0, (uint64_t{1} << 20) - used + 1};
  auto b = f.manager.Attach(greedy);
  REQUIRE(b.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(b.status().message()), Catch::StartsWith("input_buffer_bytes"));
  CHECK(f.manager.Stats().clients.size() == 1);
  greedy.input_buffer_bytes = 4096;
  auto c = f.manager.Attach(greedy);
  REQUIRE(c.ok());
  CHECK(f.manager.Stats().memory_used_bytes == used + 4096);
  CHECK(f.manager.Stats().input_buffer_bytes == a->input_buffer_bytes + 4096);
  REQUIRE(f.manager.Detach(c->session_token).ok());
  CHECK(f.manager.Stats().memory_used_bytes == used);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("an Allocate whose reply is too large is refused before anything is allocated", "[cpu]") {
  Fixture f;
  const ModelSpec m = Model("deep", 32, 1, 8, DType::kFp16, 16);  // 512-byte blocks
  auto a = f.manager.Attach({"a", m, 4096});
  REQUIRE(a.ok());
  REQUIRE(f.manager.Allocate(a->session_token, "held", 16).ok());
  const uint64_t used = f.UsedBlocks();

  auto r = f.manager.Allocate(a->session_token, "huge", 1 << 20);
  REQUIRE(r.status().code() == absl::StatusCode::kResourceExhausted);
  const std::string message(r.status().message());
  CHECK_THAT(message, Catch::StartsWith("num_new_tokens 1048576 would make a reply of"));
  CHECK_THAT(message, Catch::Contains("32-layer pool"));
  CHECK_THAT(message, Catch::Contains("--max_reply_bytes"));
  CHECK(f.UsedBlocks() == used);
  CHECK(f.manager.Stats().num_sequences == 1);
  REQUIRE(f.manager.CheckInvariants().ok());

  // The largest value the message names is accepted; one more is not.
  const size_t at = message.find("at most ");
  REQUIRE(at != std::string::npos);
  const uint32_t largest = static_cast<uint32_t>(std::stoul(message.substr(at + 8)));
  CHECK(largest > 10000);
  CHECK(f.manager.Allocate(a->session_token, "edge", largest + 1).status().code() ==
        absl::StatusCode::kResourceExhausted);
  REQUIRE(f.manager.Allocate(a->session_token, "edge", largest).ok());
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("GetSequence and Fork refuse replies over the bound and change nothing", "[cpu]") {
  CacheManagerOptions options;
  options.max_reply_bytes = 8 << 10;
  Fixture f(options);
  const ModelSpec m = Model("long", 4, 1, 8, DType::kFp16, 1);  // a block per token
  auto a = f.manager.Attach({"a", m, 4096});
  REQUIRE(a.ok());
  for (int i = 0; i < 8; ++i) REQUIRE(f.manager.Allocate(a->session_token, "s", 256).ok());
  auto get = f.manager.GetSequence(a->session_token, "s", true);
  REQUIRE(get.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(get.status().message()),
             Catch::StartsWith("GetSequence of sequence_id \"s\" would make a reply of"));
  auto fork = f.manager.Fork(a->session_token, "s", "child");
  REQUIRE(fork.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(f.manager.Stats().num_sequences == 1);
  // Short sequences are still described.
  REQUIRE(f.manager.Allocate(a->session_token, "short", 4).ok());
  CHECK(f.manager.GetSequence(a->session_token, "short", true).ok());
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("messages quote at most 64 bytes of what a client sent", "[cpu]") {
  Fixture f;
  const std::string huge(4 << 20, 'x');
  auto bad_model = f.manager.Attach({"a", Small(huge), 8});
  REQUIRE(bad_model.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(bad_model.status().message()), Catch::StartsWith("model.name"));
  CHECK(bad_model.status().message().size() < 256);

  auto a = f.manager.Attach({"a", Small(), 8});
  REQUIRE(a.ok());
  Caller op;
  op.operator_credential = true;
  for (const absl::Status& s :
       {f.manager.Allocate(a->session_token, huge, 1).status(),
        f.manager.GetSequence(a->session_token, huge, true).status(),
        f.manager.Free(a->session_token, huge).status(), f.manager.Free(op, huge).status(),
        f.manager.Fork(a->session_token, huge, "c").status()}) {
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK(s.message().size() < 256);
  }
  REQUIRE(f.manager.Allocate(a->session_token, "p", 1).ok());
  auto fork = f.manager.Fork(a->session_token, "p", huge);
  REQUIRE(fork.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(fork.status().message()), Catch::StartsWith("child_sequence_id"));

  auto preset = ResolvePreset(huge);
  REQUIRE(preset.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(preset.status().message()), Catch::StartsWith("policy.preset \"xxx"));
  CHECK(preset.status().message().size() < 512);
}

TEST_CASE("a model mismatch names the differing fields, RoPE included, not their values", "[cpu]") {
  Fixture f;
  ModelSpec mine = Small("shared");
  mine.rope.theta = 500000;
  REQUIRE(f.manager.Attach({"a", mine, 8}).ok());
  ModelSpec theirs = Small("shared");  // looks the same but for RoPE
  auto r = f.manager.Attach({"b", theirs, 8});
  REQUIRE(r.status().code() == absl::StatusCode::kFailedPrecondition);
  const std::string message(r.status().message());
  CHECK_THAT(message, Catch::StartsWith("model.name \"shared\" is attached with another "
                                        "description (differing: rope.theta)"));
  CHECK_THAT(message, !Catch::Contains("500000"));
  theirs.num_kv_heads = 1;
  theirs.num_q_heads = 1;
  auto r2 = f.manager.Attach({"b", theirs, 8});
  CHECK_THAT(std::string(r2.status().message()),
             Catch::Contains("(differing: num_q_heads, num_kv_heads, rope.theta)"));
}

}  // namespace
}  // namespace cachemgr
