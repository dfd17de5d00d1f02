// A background Compress (CompressParams::background, FinishCompress): the call returns at once,
// the sequence stays readable and appendable while the work runs, and the rows appended
// meanwhile follow the kept ones, each keeping its position.
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cachemgr/cache_manager.h"
#include "tests/cachemgr/compress_fixture.h"
#include "tests/cachemgr/gated_backend.h"

namespace cachemgr {
namespace {

using GatedFixture = BasicFixture<testing::GatedBackend>;

// Appends `count` tokens to `id`, writes random KV into them through the reply's slots and
// records it in f.keys / f.values (indexed by position, as Fill's).
template <typename F>
void AppendTokens(F& f, const std::string& id, uint32_t count, uint32_t seed) {
  auto alloc = f.manager.Allocate(f.a.session_token, id, count);
  REQUIRE(alloc.ok());
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (uint32_t i = 0; i < count; ++i) {
      const int64_t slot = alloc->layers[l].slot_mapping[i];
      for (uint32_t h = 0; h < kKvHeads; ++h) {
        float* k = f.Head(l, kernels::KvPlane::kKey, slot / kBlock, slot % kBlock, h);
        float* v = f.Head(l, kernels::KvPlane::kValue, slot / kBlock, slot % kBlock, h);
        for (uint32_t d = 0; d < kDim; ++d) {
          k[d] = normal(rng);
          v[d] = normal(rng);
          f.keys[l].push_back(k[d]);
          f.values[l].push_back(v[d]);
        }
      }
    }
  }
}

// Row `row` of KV head `h` of layer `l`, through `table`, holds the KV of position `pos`.
template <typename F>
bool RowHolds(F& f, uint32_t l, const std::vector<uint32_t>& table, uint32_t row, uint32_t h,
              uint32_t pos) {
  const size_t at = (size_t{pos} * kKvHeads + h) * kDim;
  const uint32_t block = table[row / kBlock], in_block = row % kBlock;
  return std::memcmp(f.Head(l, kernels::KvPlane::kKey, block, in_block, h), &f.keys[l][at],
                     kDim * 4) == 0 &&
         std::memcmp(f.Head(l, kernels::KvPlane::kValue, block, in_block, h), &f.values[l][at],
                     kDim * 4) == 0;
}

// Every row of every plain layer holds the KV of the position the result names for it.
template <typename F>
void CheckRowsAtPositions(F& f, const CompressResult& r) {
  for (uint32_t l = 0; l < r.layers.size(); ++l) {
    const CompressedLayerResult& cl = r.layers[l];
    if (cl.codebook) continue;
    REQUIRE(cl.kept_positions.size() == size_t{kKvHeads} * cl.num_tokens);
    for (uint32_t h = 0; h < kKvHeads; ++h) {
      for (uint32_t row = 0; row < cl.num_tokens; ++row) {
        INFO("layer " << l << " head " << h << " row " << row);
        CHECK(RowHolds(f, l, cl.block_ids, row, h,
                       cl.kept_positions[size_t{h} * cl.num_tokens + row]));
      }
    }
  }
}

// A background Compress of a policy that reads no inputs.
CompressParams BackgroundParams(const std::string& preset, double r = 0.3) {
  CompressParams p = Params(preset, r);
  p.input = CompressInput::kNone;
  p.background = true;
  return p;
}

// Per head: `kept` (rows per head) then positions [first, first + appended).
std::vector<uint32_t> Expected(const std::vector<uint32_t>& kept, uint32_t rows, uint32_t first,
                               uint32_t appended) {
  std::vector<uint32_t> out;
  for (uint32_t h = 0; h < kKvHeads; ++h) {
    out.insert(out.end(), kept.begin() + size_t{h} * rows, kept.begin() + size_t{h + 1} * rows);
    for (uint32_t i = 0; i < appended; ++i) out.push_back(first + i);
  }
  return out;
}

TEST_CASE("a background Compress returns at once; rows appended meanwhile follow the kept ones",
          "[cpu]") {
  Fixture f;
  f.Fill("s", 5);
  CompressParams params = Params("snapkv", 0.5);
  params.background = true;
  auto started = f.manager.Compress(f.a.session_token, "s", params);
  REQUIRE(started.ok());
  CHECK(started->pending);
  CHECK(started->layers.empty());
  // The inputs were copied before the reply: the buffer may be written again at once.
  std::memset(f.input.data(), 0, f.scores.size() * 4);

  auto seq = f.manager.GetSequence(f.a.session_token, "s", false);
  REQUIRE(seq.ok());
  CHECK(seq->compress_pending);
  CHECK_FALSE(seq->compressed);
  CHECK(seq->busy.empty());
  auto twice = f.manager.Compress(f.a.session_token, "s", Params("snapkv", 0.5));
  CHECK(twice.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(twice.status().message()), Catch::Contains("FinishCompress"));

  // Decoding goes on: 6 tokens (one more block and part of another).
  AppendTokens(f, "s", 6, 9);
  REQUIRE(f.manager.CheckInvariants().ok());

  auto done = f.manager.FinishCompress(f.a.session_token, "s", /*wait=*/true, "");
  REQUIRE(done.ok());
  CHECK_FALSE(done->pending);
  CHECK(done->rows_appended == 6);
  const compress::SequenceResult ref = f.Reference(Params("snapkv", 0.5).policy, 0.5);
  uint64_t blocks = 0;
  for (uint32_t l = 0; l < kLayers; ++l) {
    INFO("layer " << l);
    const CompressedLayerResult& cl = done->layers[l];
    const uint32_t kept = ref.layers[l].kept_per_head;
    CHECK(cl.kept_per_head == kept);
    CHECK(cl.num_tokens == kept + 6);
    CHECK(cl.kept_positions == Expected(ref.layers[l].kept, kept, kTokens, 6));
    blocks += (kept + 6 + kBlock - 1) / kBlock;
  }
  CheckRowsAtPositions(f, *done);
  REQUIRE(f.manager.CheckInvariants().ok());
  CHECK(f.UsedBlocks() == blocks);
  seq = f.manager.GetSequence(f.a.session_token, "s", false);
  REQUIRE(seq.ok());
  CHECK(seq->compressed);
  CHECK_FALSE(seq->compress_pending);
  CHECK(seq->num_positions == kTokens + 6);

  // The sequence decodes on: the next row's position is the next token's.
  REQUIRE(f.manager.Allocate(f.a.session_token, "s", 1).ok());
  auto fetched = f.manager.Fetch(f.a.session_token, "s", {0});
  REQUIRE(fetched.ok());
  const FetchedLayerResult& fl = (*fetched)[0];
  CHECK(fl.positions[fl.num_tokens - 1] == kTokens + 6);
  auto again = f.manager.FinishCompress(f.a.session_token, "s", true, "");
  CHECK(again.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(again.status().message()), Catch::Contains("no background Compress"));
  REQUIRE(f.manager.Free(f.a.session_token, "s").ok());
  CHECK(f.UsedBlocks() == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("a background Compress holds its last block: an append copies it on write", "[cpu]") {
  Fixture f;
  f.Fill("s", 7);
  AppendTokens(f, "s", 2, 1);  // 42 tokens: block 10 holds 2 of 4 rows
  CompressParams params = BackgroundParams("streamingllm", 0.5);
  REQUIRE(f.manager.Compress(f.a.session_token, "s", params).ok());
  const uint64_t before = f.UsedBlocks();
  CHECK(before == 11 * kLayers);
  auto held = f.manager.GetSequence(f.a.session_token, "s", false);
  REQUIRE(held.ok());
  AppendTokens(f, "s", 3, 2);  // rows 42-44: a copy of block 10, and block 11
  auto grown = f.manager.GetSequence(f.a.session_token, "s", false);
  REQUIRE(grown.ok());
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK(grown->layers[l].block_ids[10] != held->layers[l].block_ids[10]);
    // The held block still holds what the work reads.
    for (uint32_t h = 0; h < kKvHeads; ++h) {
      CHECK(RowHolds(f, l, held->layers[l].block_ids, 41, h, 41));
    }
  }
  CHECK(f.UsedBlocks() == before + 2 * kLayers);
  REQUIRE(f.manager.CheckInvariants().ok());

  auto done = f.manager.FinishCompress(f.a.session_token, "s", true, "");
  REQUIRE(done.ok());
  CHECK(done->rows_appended == 3);
  uint64_t blocks = 0;
  for (const CompressedLayerResult& cl : done->layers) {
    CHECK(cl.num_tokens == cl.kept_per_head + 3);
    for (uint32_t h = 0; h < kKvHeads; ++h) {
      for (uint32_t i = 0; i < 3; ++i) {
        CHECK(cl.kept_positions[size_t{h} * cl.num_tokens + cl.kept_per_head + i] == 42 + i);
      }
    }
    blocks += cl.block_ids.size();
  }
  CheckRowsAtPositions(f, *done);
  CHECK(f.UsedBlocks() == blocks);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("a fork taken while a background Compress works keeps its rows", "[cpu]") {
  Fixture f;
  f.Fill("s", 8);
  CompressParams params = BackgroundParams("streamingllm", 0.4);
  REQUIRE(f.manager.Compress(f.a.session_token, "s", params).ok());
  AppendTokens(f, "s", 2, 4);
  REQUIRE(f.manager.Fork(f.a.session_token, "s", "child").ok());
  auto child = f.manager.GetSequence(f.a.session_token, "child", false);
  REQUIRE(child.ok());
  CHECK_FALSE(child->compress_pending);
  // The parent's blocks are shared now: its kept and appended rows go to fresh blocks.
  auto done = f.manager.FinishCompress(f.a.session_token, "s", true, "");
  REQUIRE(done.ok());
  CHECK(done->rows_appended == 2);
  CheckRowsAtPositions(f, *done);
  REQUIRE(f.manager.CheckInvariants().ok());
  child = f.manager.GetSequence(f.a.session_token, "child", false);
  REQUIRE(child.ok());
  for (uint32_t l = 0; l < kLayers; ++l) {
    REQUIRE(child->layers[l].num_tokens == kTokens + 2);
    for (uint32_t row = 0; row < kTokens + 2; ++row) {
      for (uint32_t h = 0; h < kKvHeads; ++h) {
        CHECK(RowHolds(f, l, child->layers[l].block_ids, row, h, row));
      }
    }
  }
}

TEST_CASE("codebook layers with rows appended during a background Compress stay resident",
          "[cpu]") {
  GatedFixture f;
  f.Fill("s", 21);
  CompressParams params = Params("spindlekv", 0.6);
  params.policy.codebook_only_if_smaller = false;
  params.policy.append_batch = 4;
  params.background = true;
  f.backend.gather_armed = true;
  REQUIRE(f.manager.Compress(f.a.session_token, "s", params).ok());
  // The work is reading the rows outside the lock, and waits there.
  f.backend.entered.WaitForNotification();
  auto seq = f.manager.GetSequence(f.a.session_token, "s", false);
  REQUIRE(seq.ok());
  CHECK(seq->compress_pending);
  CHECK_FALSE(seq->compress_ready);
  auto early = f.manager.FinishCompress(f.a.session_token, "s", /*wait=*/false, "");
  REQUIRE(early.ok());
  CHECK(early->pending);
  AppendTokens(f, "s", 4, 3);
  f.backend.release.Notify();

  // Polled without waiting, as an engine does between steps: pending while the work runs, then
  // while the codebook layers are reconstructed, then applied.
  absl::StatusOr<CompressResult> done = f.manager.FinishCompress(f.a.session_token, "s", false, "");
  for (int i = 0; i < 20000 && done.ok() && done->pending; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    done = f.manager.FinishCompress(f.a.session_token, "s", /*wait=*/false, "");
  }
  REQUIRE(done.ok());
  REQUIRE_FALSE(done->pending);
  CHECK(done->rows_appended == 4);
  bool ready_first = false;
  for (const Event& e : f.events) {
    if (e.type == EventType::kSequenceCompressReady) ready_first = true;
    if (e.type == EventType::kSequenceCompressed) CHECK(ready_first);
  }
  CHECK(ready_first);
  REQUIRE(f.manager.CheckInvariants().ok());
  // Left resident: the kept rows as they were, then the appended rows as written (exact); after
  // Park and Fetch, every row within the thresholds of what was written.
  auto check_rows = [&](const std::vector<uint32_t>& table, const std::vector<uint32_t>& positions,
                        uint32_t l, uint32_t kept, bool exact) {
    const uint32_t rows = kept + 4;
    REQUIRE(positions.size() == size_t{kKvHeads} * rows);
    for (uint32_t h = 0; h < kKvHeads; ++h) {
      for (uint32_t row = 0; row < rows; ++row) {
        const uint32_t pos = positions[size_t{h} * rows + row];
        if (row >= kept) CHECK(pos == kTokens + row - kept);
        if (exact) {
          CHECK(RowHolds(f, l, table, row, h, pos));
          continue;
        }
        const size_t at = (size_t{pos} * kKvHeads + h) * kDim;
        const uint32_t block = table[row / kBlock];
        CHECK(Cos(f.Head(l, kernels::KvPlane::kKey, block, row % kBlock, h), &f.keys[l][at], kDim) >
              params.policy.theta_k - 1e-5);
        CHECK(Cos(f.Head(l, kernels::KvPlane::kValue, block, row % kBlock, h), &f.values[l][at],
                  kDim) > params.policy.theta_v - 1e-5);
      }
    }
  };
  for (uint32_t l = 0; l < kLayers; ++l) {
    INFO("layer " << l);
    REQUIRE(done->layers[l].codebook);
    const uint32_t kept = done->layers[l].kept_per_head;
    REQUIRE(done->layers[l].num_tokens == kept + 4);
    REQUIRE(done->layers[l].block_ids.size() == (kept + 4 + kBlock - 1) / kBlock);
    check_rows(done->layers[l].block_ids, done->layers[l].kept_positions, l, kept, true);
  }
  // Park codes the appended rows; Fetch gives every row back within the thresholds.
  auto parked = f.manager.Park(f.a.session_token, "s", {});
  REQUIRE(parked.ok());
  for (const ParkedLayerResult& p : *parked) CHECK(p.rows_appended == 4);
  CHECK(f.UsedBlocks() == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
  auto fetched = f.manager.Fetch(f.a.session_token, "s", {});
  REQUIRE(fetched.ok());
  for (uint32_t l = 0; l < kLayers; ++l) {
    INFO("layer " << l << " after Park and Fetch");
    const FetchedLayerResult& fl = (*fetched)[l];
    CHECK(fl.positions == done->layers[l].kept_positions);
    check_rows(fl.block_ids, fl.positions, l, done->layers[l].kept_per_head, false);
  }
  REQUIRE(f.manager.Free(f.a.session_token, "s").ok());
  REQUIRE(f.manager.CheckInvariants().ok());
}

// Fills "s" and starts a background codebook Compress of it whose work then waits inside its
// first read of the pool, until f.backend.release.
void StartHeldInItsRead(GatedFixture& f, uint32_t seed) {
  f.Fill("s", seed);
  CompressParams params = Params("codebook", 0.5);
  params.background = true;
  f.backend.gather_armed = true;
  REQUIRE(f.manager.Compress(f.a.session_token, "s", params).ok());
  f.backend.entered.WaitForNotification();
}

TEST_CASE("a background Compress ends with its sequence, its error, or the shutdown", "[cpu]") {
  SECTION("Free while the work runs") {
    GatedFixture f;
    StartHeldInItsRead(f, 2);
    REQUIRE(f.manager.Free(f.a.session_token, "s").ok());
    REQUIRE(f.manager.CheckInvariants().ok());
    CHECK(f.UsedBlocks() == 0);  // its references went with it
    f.backend.release.Notify();
    auto gone = f.manager.FinishCompress(f.a.session_token, "s", true, "");
    CHECK(gone.status().code() == absl::StatusCode::kNotFound);
    REQUIRE(f.manager.CheckInvariants().ok());
  }
  SECTION("a lease that expires quarantines the held blocks with the sequence's") {
    Fixture f;
    f.Fill("s", 6);
    AppendTokens(f, "s", 2, 1);  // a partial last block, copied on the next write
    CompressParams params = BackgroundParams("streamingllm");
    REQUIRE(f.manager.Compress(f.a.session_token, "s", params).ok());
    AppendTokens(f, "s", 1, 2);
    f.clock.Advance(f.manager.options().lease_timeout + absl::Seconds(1));
    REQUIRE(f.manager.ExpireLeases().size() == 1);
    REQUIRE(f.manager.CheckInvariants().ok());
    // 11 blocks per layer the sequence held (one of them the copy) and the one it copied.
    uint64_t quarantined = 0;
    const StatsSnapshot stats = f.manager.Stats();
    REQUIRE(stats.pools.size() == 1);  // kept by its quarantined blocks
    for (const LayerOccupancy& l : stats.pools[0].layers) {
      quarantined += l.quarantined_blocks;
      CHECK(l.used_blocks == 0);
    }
    CHECK(quarantined == 12 * kLayers);
  }
  SECTION("a target the policy cannot reach leaves the sequence as it was") {
    Fixture f;
    f.Fill("s", 3);
    CompressParams params = BackgroundParams("streamingllm");
    params.target = {compress::TargetKind::kByteRatio, 1e-6};
    REQUIRE(f.manager.Compress(f.a.session_token, "s", params).ok());
    AppendTokens(f, "s", 1, 5);
    auto failed = f.manager.FinishCompress(f.a.session_token, "s", true, "");
    CHECK(failed.status().code() == absl::StatusCode::kOutOfRange);
    CHECK_THAT(std::string(failed.status().message()), Catch::Contains("target.byte_ratio"));
    // The work's failure ended it; asking again answers the same and changes nothing.
    auto again = f.manager.FinishCompress(f.a.session_token, "s", true, "");
    CHECK(again.status() == failed.status());
    auto seq = f.manager.GetSequence(f.a.session_token, "s", false);
    REQUIRE(seq.ok());
    CHECK_FALSE(seq->compressed);
    CHECK_FALSE(seq->compress_pending);
    CHECK_THAT(seq->compress_error, Catch::Contains("target.byte_ratio"));
    for (uint32_t l = 0; l < kLayers; ++l) {
      REQUIRE(seq->layers[l].num_tokens == kTokens + 1);
      for (uint32_t row = 0; row <= kTokens; ++row) {
        CHECK(RowHolds(f, l, seq->layers[l].block_ids, row, 1, row));
      }
    }
    CHECK(f.UsedBlocks() == 11 * kLayers);
    REQUIRE(f.manager.CheckInvariants().ok());
    // The next Compress starts afresh.
    params.target = {compress::TargetKind::kReserveRatio, 0.5};
    REQUIRE(f.manager.Compress(f.a.session_token, "s", params).ok());
    seq = f.manager.GetSequence(f.a.session_token, "s", false);
    REQUIRE(seq.ok());
    CHECK(seq->compress_error.empty());
    REQUIRE(f.manager.FinishCompress(f.a.session_token, "s", true, "").ok());
  }
  SECTION("a refusal leaves it pending: a fork's shared layers need free blocks") {
    Fixture f;
    f.Fill("s", 9);
    CompressParams params = BackgroundParams("streamingllm", 0.5);
    REQUIRE(f.manager.Compress(f.a.session_token, "s", params).ok());
    REQUIRE(f.manager.Fork(f.a.session_token, "s", "child").ok());
    REQUIRE(f.manager.Allocate(f.a.session_token, "filler", 54 * kBlock).ok());  // the rest
    const auto before = f.manager.GetSequence(f.a.session_token, "s", true);
    REQUIRE(before.ok());
    const uint64_t used = f.UsedBlocks();
    auto refused = f.manager.FinishCompress(f.a.session_token, "s", true, "");
    CHECK(refused.status().code() == absl::StatusCode::kResourceExhausted);
    CHECK_THAT(std::string(refused.status().message()), Catch::Contains("fresh blocks"));
    const auto after = f.manager.GetSequence(f.a.session_token, "s", true);
    REQUIRE(after.ok());
    CHECK(after->compress_pending);
    CHECK(after->compress_error.empty());
    for (uint32_t l = 0; l < kLayers; ++l) {
      CHECK(after->layers[l].block_ids == before->layers[l].block_ids);
      CHECK(after->layers[l].kv_digest == before->layers[l].kv_digest);
    }
    CHECK(f.UsedBlocks() == used);
    REQUIRE(f.manager.CheckInvariants().ok());
    REQUIRE(f.manager.Free(f.a.session_token, "filler").ok());
    auto done = f.manager.FinishCompress(f.a.session_token, "s", true, "");
    REQUIRE(done.ok());
    CheckRowsAtPositions(f, *done);
    REQUIRE(f.manager.CheckInvariants().ok());
  }
  SECTION("shutdown stops the work; FinishCompress answers UNAVAILABLE") {
    GatedFixture f;
    StartHeldInItsRead(f, 4);
    f.manager.BeginShutdown();
    f.backend.release.Notify();
    auto stopped = f.manager.FinishCompress(f.a.session_token, "s", true, "");
    CHECK(stopped.status().code() == absl::StatusCode::kUnavailable);
    auto seq = f.manager.GetSequence(f.a.session_token, "s", false);
    REQUIRE(seq.ok());
    CHECK_FALSE(seq->compressed);
    CHECK_FALSE(seq->compress_pending);
    REQUIRE(f.manager.CheckInvariants().ok());
  }
  SECTION("a client may have a few unfinished; operators may not start one") {
    Fixture f;
    CompressParams params = BackgroundParams("streamingllm");
    const uint32_t limit = f.manager.options().max_background_compresses_per_client;
    for (uint32_t i = 0; i <= limit; ++i) {
      REQUIRE(f.manager.Allocate(f.a.session_token, "s" + std::to_string(i), 8).ok());
    }
    for (uint32_t i = 0; i < limit; ++i) {
      REQUIRE(f.manager.Compress(f.a.session_token, "s" + std::to_string(i), params).ok());
    }
    const std::string last = "s" + std::to_string(limit);
    auto over = f.manager.Compress(f.a.session_token, last, params);
    CHECK(over.status().code() == absl::StatusCode::kResourceExhausted);
    CHECK_THAT(std::string(over.status().message()), Catch::Contains("background"));
    REQUIRE(f.manager.CheckInvariants().ok());
    // Another client (of the same owner) can neither finish nor see it; it stays pending.
    auto other = f.manager.Attach({"other", Model(), 64});
    REQUIRE(other.ok());
    auto foreign = f.manager.FinishCompress(other->session_token, "s0", true, "");
    CHECK(foreign.status().code() == absl::StatusCode::kPermissionDenied);
    auto s0 = f.manager.GetSequence(f.a.session_token, "s0", false);
    REQUIRE(s0.ok());
    CHECK(s0->compress_pending);
    REQUIRE(f.manager.FinishCompress(f.a.session_token, "s0", true, "").ok());
    REQUIRE(f.manager.Compress(f.a.session_token, last, params).ok());
    Caller op;
    op.operator_credential = true;
    auto by_operator = f.manager.Compress(op, "s0", params);
    CHECK(by_operator.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(by_operator.status().message()), Catch::Contains("background"));
    // Detach ends them all, their block references included.
    REQUIRE(f.manager.Detach(f.a.session_token).ok());
    REQUIRE(f.manager.CheckInvariants().ok());
  }
}

TEST_CASE("background Compresses of different clients take turns", "[cpu]") {
  GatedFixture f;
  StartHeldInItsRead(f, 7);  // "s" of client a: its work holds the background thread
  auto b = f.manager.Attach({"other", Model(), 64});
  REQUIRE(b.ok());
  const CompressParams params = BackgroundParams("streamingllm");
  for (const char* id : {"a1", "a2"}) {
    REQUIRE(f.manager.Allocate(f.a.session_token, id, 8).ok());
    REQUIRE(f.manager.Compress(f.a.session_token, id, params).ok());
  }
  REQUIRE(f.manager.Allocate(b->session_token, "b1", 8).ok());
  REQUIRE(f.manager.Compress(b->session_token, "b1", params).ok());
  f.backend.release.Notify();
  for (const char* id : {"s", "a1", "a2"}) {
    REQUIRE(f.manager.FinishCompress(f.a.session_token, id, true, "").ok());
  }
  REQUIRE(f.manager.FinishCompress(b->session_token, "b1", true, "").ok());
  // Published under the manager's lock, which FinishCompress took after.
  std::vector<std::string> ready;
  for (const Event& e : f.events) {
    if (e.type == EventType::kSequenceCompressReady) ready.push_back(e.sequence_id);
  }
  // b1 does not wait behind all of a's queue (in start order it would come last).
  CHECK(ready == std::vector<std::string>{"s", "a1", "b1", "a2"});
  REQUIRE(f.manager.CheckInvariants().ok());
}

}  // namespace
}  // namespace cachemgr
