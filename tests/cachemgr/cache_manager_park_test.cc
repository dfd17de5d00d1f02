// Decode-time appends to codebook layers (Fetch, Allocate, write, Park), and the busy state of a
// sequence while Compress works outside the manager's lock.
#include <atomic>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <random>
#include <thread>

#include "cachemgr/cache_manager.h"
#include "cachemgr/compress/rope.h"
#include "tests/cachemgr/compress_fixture.h"

namespace cachemgr {
namespace {

compress::RopeParams FixtureRope() {
  compress::RopeParams rope;  // Model(): interleaved, theta 10000
  rope.head_dim = kDim;
  return rope;
}

// Writes rows [first, first + count) of layer `l` of `id` with `keys`/`values`
// [count, kKvHeads, kDim] through the table GetSequence reports.
void WriteRows(Fixture& f, const std::string& id, uint32_t l, uint32_t first, uint32_t count,
               const std::vector<float>& keys, const std::vector<float>& values) {
  auto seq = f.manager.GetSequence(f.a.session_token, id, false);
  REQUIRE(seq.ok());
  const auto& table = seq->layers[l].block_ids;
  for (uint32_t i = 0; i < count; ++i) {
    const uint32_t row = first + i;
    for (uint32_t h = 0; h < kKvHeads; ++h) {
      std::memcpy(f.Head(l, kernels::KvPlane::kKey, table[row / kBlock], row % kBlock, h),
                  &keys[(i * kKvHeads + h) * kDim], kDim * 4);
      std::memcpy(f.Head(l, kernels::KvPlane::kValue, table[row / kBlock], row % kBlock, h),
                  &values[(i * kKvHeads + h) * kDim], kDim * 4);
    }
  }
}

TEST_CASE("rows appended after Fetch are coded by Park: matched, queued, batch-coded", "[cpu]") {
  Fixture f;
  f.Fill("s", 21);
  CompressParams params = Params("spindlekv", 0.6);
  params.policy.codebook_only_if_smaller = false;
  params.policy.append_batch = 4;
  auto compressed = f.manager.Compress(f.a.session_token, "s", params);
  REQUIRE(compressed.ok());
  for (const auto& l : compressed->layers) REQUIRE(l.codebook);
  auto fetched = f.manager.Fetch(f.a.session_token, "s", {});
  REQUIRE(fetched.ok());
  std::vector<uint32_t> rows0(kLayers);  // per layer: pyramid budgets differ
  for (uint32_t l = 0; l < kLayers; ++l) rows0[l] = (*fetched)[l].num_tokens;

  // 4 new tokens: 2 repeat the direction of the last token (in the window, so every head kept
  // it; K re-rotated at the new position), 2 are fresh random directions.
  constexpr uint32_t kNew = 4;
  auto alloc = f.manager.Allocate(f.a.session_token, "s", kNew);
  REQUIRE(alloc.ok());
  CHECK(alloc->first_position == kTokens);
  REQUIRE(f.manager.CheckInvariants().ok());
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  const compress::RopeParams rope = FixtureRope();
  std::vector<std::vector<float>> new_keys(kLayers), new_values(kLayers);
  for (uint32_t l = 0; l < kLayers; ++l) {
    const uint32_t src = kTokens - 1;
    std::vector<float> k(kNew * kKvHeads * kDim), v(k.size());
    for (uint32_t i = 0; i < kNew; ++i) {
      for (uint32_t h = 0; h < kKvHeads; ++h) {
        for (uint32_t d = 0; d < kDim; ++d) {
          const size_t at = (i * kKvHeads + h) * kDim + d;
          const size_t from = (src * kKvHeads + h) * kDim + d;
          k[at] = i < 2 ? f.keys[l][from] : normal(rng);
          v[at] = i < 2 ? 2.0f * f.values[l][from] : normal(rng);
        }
      }
    }
    // Copies: un-rotate at the source position, rotate at the new one.
    std::vector<float> copies(k.begin(), k.begin() + 2 * kKvHeads * kDim);
    REQUIRE(compress::UnapplyRope(rope, {src, src}, kKvHeads, absl::MakeSpan(copies)).ok());
    REQUIRE(
        compress::ApplyRope(rope, {kTokens, kTokens + 1}, kKvHeads, absl::MakeSpan(copies)).ok());
    std::copy(copies.begin(), copies.end(), k.begin());
    WriteRows(f, "s", l, rows0[l], kNew, k, v);
    new_keys[l] = k;
    new_values[l] = v;
  }

  const uint64_t used_before_park = f.UsedBlocks();
  auto parked = f.manager.Park(f.a.session_token, "s", {});
  REQUIRE(parked.ok());
  REQUIRE(f.manager.CheckInvariants().ok());
  CHECK(f.UsedBlocks() == 0);
  uint64_t released = 0;
  for (const ParkedLayerResult& p : *parked) {
    INFO("layer " << p.layer);
    released += p.blocks_released;
    CHECK(p.rows_appended == kNew);
    CHECK(p.num_tokens == rows0[p.layer] + kNew);
    // The copies match (2 tokens x 2 heads x K and V); the random rows match nothing.
    CHECK(p.append.matched >= 8);
    CHECK(p.append.matched + p.append.queued == kNew * kKvHeads * 2);
    // One layer-scope part per plane: 4 random K vectors queue, reaching the batch of 4.
    CHECK(p.append.batch_coded == p.append.queued);
    CHECK(p.queued == 0);
    CHECK(p.append.new_entries > 0);
  }
  CHECK(released == used_before_park);
  CHECK(f.events.back().type == EventType::kSequenceParked);

  // A parked layer cannot take appends; a second Park reports it unchanged.
  CHECK(f.manager.Allocate(f.a.session_token, "s", 1).status().code() ==
        absl::StatusCode::kFailedPrecondition);
  auto again = f.manager.Park(f.a.session_token, "s", {0});
  REQUIRE(again.ok());
  CHECK((*again)[0].rows_appended == 0);
  CHECK((*again)[0].blocks_released == 0);

  // Fetch reconstructs every row, the appended ones within theta of what was written.
  auto refetched = f.manager.Fetch(f.a.session_token, "s", {});
  REQUIRE(refetched.ok());
  REQUIRE(f.manager.CheckInvariants().ok());
  for (uint32_t l = 0; l < kLayers; ++l) {
    const FetchedLayerResult& fl = (*refetched)[l];
    REQUIRE(fl.num_tokens == rows0[l] + kNew);
    for (uint32_t h = 0; h < kKvHeads; ++h) {
      for (uint32_t i = 0; i < kNew; ++i) {
        const uint32_t row = rows0[l] + i;
        CHECK(fl.positions[size_t{h} * fl.num_tokens + row] == kTokens + i);
        const float* k =
            f.Head(l, kernels::KvPlane::kKey, fl.block_ids[row / kBlock], row % kBlock, h);
        const float* v =
            f.Head(l, kernels::KvPlane::kValue, fl.block_ids[row / kBlock], row % kBlock, h);
        CHECK(Cos(k, &new_keys[l][(i * kKvHeads + h) * kDim], kDim) > params.policy.theta_k - 1e-5);
        CHECK(Cos(v, &new_values[l][(i * kKvHeads + h) * kDim], kDim) >
              params.policy.theta_v - 1e-5);
      }
    }
  }
  REQUIRE(f.manager.Free(f.a.session_token, "s").ok());
  CHECK(f.UsedBlocks() == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("Park refuses what it cannot do and changes nothing", "[cpu]") {
  Fixture f;
  f.Fill("s", 22);
  auto never = f.manager.Park(f.a.session_token, "s", {});
  CHECK(never.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(never.status().message()), Catch::Contains("never compressed"));

  // snapkv keeps every layer as plain rows.
  REQUIRE(f.manager.Compress(f.a.session_token, "s", Params("snapkv")).ok());
  const auto before = f.manager.GetSequence(f.a.session_token, "s", true);
  auto plain = f.manager.Park(f.a.session_token, "s", {1});
  CHECK(plain.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(plain.status().message()), Catch::Contains("layers[0] = 1"));
  auto range = f.manager.Park(f.a.session_token, "s", {kLayers});
  CHECK(range.status().code() == absl::StatusCode::kInvalidArgument);
  auto twice = f.manager.Park(f.a.session_token, "s", {0, 0});
  CHECK(twice.status().code() == absl::StatusCode::kInvalidArgument);
  auto none = f.manager.Park(f.a.session_token, "s", {});  // no codebook layer: nothing to do
  REQUIRE(none.ok());
  CHECK(none->empty());
  const auto after = f.manager.GetSequence(f.a.session_token, "s", true);
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK(after->layers[l].block_ids == before->layers[l].block_ids);
    CHECK(after->layers[l].kv_digest == before->layers[l].kv_digest);
  }
  CHECK(f.manager.Park(f.a.session_token, "nope", {}).status().code() ==
        absl::StatusCode::kNotFound);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("a sequence is busy while Compress works outside the lock", "[cpu]") {
  // A long sequence and a codebook on every layer take the compressor long enough to be seen.
  HostBackend backend;
  FakeClock clock;
  CacheManager manager({}, &backend, &clock, nullptr);
  ModelSpec model = Model();
  model.name = "long";
  model.num_layers = 2;
  auto a = manager.Attach({"engine", model, 2048, uint64_t{2} * kQHeads * 4096 * 4});
  REQUIRE(a.ok());
  constexpr uint32_t kLong = 4096;
  CompressParams params = Params("codebook", 1.0);
  params.policy.codebook_only_if_smaller = false;
  params.input = CompressInput::kNone;
  bool observed = false;
  for (int attempt = 0; attempt < 5 && !observed; ++attempt) {
    const std::string id = "long" + std::to_string(attempt);
    REQUIRE(manager.Allocate(a->session_token, id, kLong).ok());
    std::atomic<bool> done{false};
    absl::Status compress_status;
    std::thread worker([&] {
      compress_status = manager.Compress(a->session_token, id, params).status();
      done = true;
    });
    while (!done) {
      auto seq = manager.GetSequence(a->session_token, id, false);
      if (seq.ok() && seq->busy == "Compress") {
        observed = true;
        CHECK(manager.Allocate(a->session_token, id, 1).status().code() ==
              absl::StatusCode::kAborted);
        CHECK(manager.Fork(a->session_token, id, id + "-fork").status().code() ==
              absl::StatusCode::kAborted);
        CHECK(manager.Fetch(a->session_token, id, {}).status().code() ==
              absl::StatusCode::kAborted);
        CHECK(manager.Compress(a->session_token, id, params).status().code() ==
              absl::StatusCode::kAborted);
        // Free is allowed: the compressor then finds the sequence gone.
        REQUIRE(manager.Free(a->session_token, id).ok());
        REQUIRE(manager.CheckInvariants().ok());
        break;
      }
    }
    worker.join();
    if (observed) {
      CHECK(compress_status.code() == absl::StatusCode::kAborted);
      CHECK_THAT(std::string(compress_status.message()), Catch::Contains("freed"));
      CHECK_FALSE(manager.GetSequence(a->session_token, id, false).ok());
    } else {
      REQUIRE(compress_status.ok());
      REQUIRE(manager.Free(a->session_token, id).ok());
    }
    REQUIRE(manager.CheckInvariants().ok());
  }
  CHECK(observed);
  CHECK(manager.Stats().pools[0].layers[0].used_blocks == 0);
}

}  // namespace
}  // namespace cachemgr
