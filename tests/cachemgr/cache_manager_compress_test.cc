// CacheManager::Compress / Fetch on the host backend: kept counts match the library, kept rows
// hold the original vectors, codebook layers park and reconstruct, errors change nothing.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <random>

#include "cachemgr/cache_manager.h"
#include "cachemgr/kernels/elem_convert.h"
#include "tests/cachemgr/compress_fixture.h"

namespace cachemgr {
namespace {

TEST_CASE("Compress matches the library and keeps the original rows", "[cpu]") {
  const std::string preset = GENERATE("snapkv", "pyramidkv", "streamingllm", "h2o", "spindlekv",
                                      "codebook", "fullkv", "pyramidinfer", "zigzagkv");
  Fixture f;
  f.Fill("s", 7);
  const uint64_t used_before = f.UsedBlocks();
  const CompressParams params = Params(preset);
  const compress::SequenceResult ref = f.Reference(params.policy, 0.3);
  auto r = f.manager.Compress(f.a.session_token, "s", params);
  REQUIRE(r.ok());
  REQUIRE(f.manager.CheckInvariants().ok());
  REQUIRE(r->layers.size() == kLayers);
  CHECK(r->honest_ratio == Approx(ref.stats.honest_ratio));
  CHECK(r->bytes_before == uint64_t{kLayers} * (kTokens / kBlock) * f.layout.block_bytes());
  CHECK(f.UsedBlocks() == used_before - r->blocks_released);
  uint64_t blocks_after = 0;
  for (uint32_t l = 0; l < kLayers; ++l) {
    const auto& out = r->layers[l];
    const auto& lr = ref.layers[l];
    INFO("preset " << preset << " layer " << l);
    CHECK(out.kept_per_head == lr.kept_per_head);
    CHECK(out.codebook == lr.key_codebook.has_value());
    const uint32_t rows = out.num_tokens;
    // Each KV head stores exactly the library's kept tokens, in order.
    CHECK(rows == lr.kept_per_head);
    CHECK(out.kept_positions == lr.kept);
    if (out.codebook) {
      CHECK(out.block_ids.empty());
      CHECK(out.key_codebook_size > 0);
      continue;
    }
    REQUIRE(out.block_ids.size() == (rows + kBlock - 1) / kBlock);
    blocks_after += out.block_ids.size();
    for (uint32_t row = 0; row < rows; ++row) {
      for (uint32_t h = 0; h < kKvHeads; ++h) {
        const uint32_t tok = out.kept_positions[size_t{h} * rows + row];
        const uint32_t block = out.block_ids[row / kBlock];
        CHECK(std::memcmp(f.Head(l, kernels::KvPlane::kKey, block, row % kBlock, h),
                          &f.keys[l][(tok * kKvHeads + h) * kDim], kDim * 4) == 0);
        CHECK(std::memcmp(f.Head(l, kernels::KvPlane::kValue, block, row % kBlock, h),
                          &f.values[l][(tok * kKvHeads + h) * kDim], kDim * 4) == 0);
      }
    }
  }
  CHECK(f.UsedBlocks() == blocks_after);
  auto snap = f.manager.GetSequence(f.a.session_token, "s", true);
  REQUIRE(snap.ok());
  CHECK(snap->compressed);
  CHECK(snap->compression_policy == preset);
  REQUIRE(snap->kept_per_layer.size() == kLayers);
  CHECK(f.events.back().type == EventType::kSequenceCompressed);

  // Fetch: codebook layers get blocks holding vectors within the codebook's angle.
  auto fetched = f.manager.Fetch(f.a.session_token, "s", {});
  REQUIRE(fetched.ok());
  REQUIRE(f.manager.CheckInvariants().ok());
  for (uint32_t l = 0; l < kLayers; ++l) {
    const auto& fl = (*fetched)[l];
    CHECK(fl.positions == r->layers[l].kept_positions);
    CHECK(fl.num_tokens == r->layers[l].num_tokens);
    REQUIRE(fl.block_ids.size() == (fl.num_tokens + kBlock - 1) / kBlock);
    if (!r->layers[l].codebook) {
      CHECK(fl.new_blocks == 0);
      CHECK(fl.block_ids == r->layers[l].block_ids);
      continue;
    }
    for (uint32_t row = 0; row < fl.num_tokens; ++row) {
      for (uint32_t h = 0; h < kKvHeads; ++h) {
        const uint32_t tok = fl.positions[size_t{h} * fl.num_tokens + row];
        const uint32_t block = fl.block_ids[row / kBlock];
        CHECK(Cos(f.Head(l, kernels::KvPlane::kKey, block, row % kBlock, h),
                  &f.keys[l][(tok * kKvHeads + h) * kDim], kDim) > params.policy.theta_k - 1e-5);
        CHECK(Cos(f.Head(l, kernels::KvPlane::kValue, block, row % kBlock, h),
                  &f.values[l][(tok * kKvHeads + h) * kDim], kDim) > params.policy.theta_v - 1e-5);
      }
    }
  }
  // A second Fetch allocates nothing.
  const uint64_t used = f.UsedBlocks();
  auto again = f.manager.Fetch(f.a.session_token, "s", {});
  REQUIRE(again.ok());
  CHECK(f.UsedBlocks() == used);
  for (uint32_t l = 0; l < kLayers; ++l) CHECK((*again)[l].block_ids == (*fetched)[l].block_ids);

  // Appends after Compress land after each layer's rows.
  auto alloc = f.manager.Allocate(f.a.session_token, "s", 5);
  REQUIRE(alloc.ok());
  REQUIRE(f.manager.CheckInvariants().ok());
  CHECK(alloc->first_position == kTokens);
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK(alloc->layers[l].num_tokens == r->layers[l].num_tokens + 5);
    const auto table = f.manager.GetSequence(f.a.session_token, "s", false)->layers[l].block_ids;
    const uint32_t row0 = r->layers[l].num_tokens;
    CHECK(alloc->layers[l].slot_mapping[0] ==
          int64_t{table[row0 / kBlock]} * kBlock + row0 % kBlock);
  }
  auto freed = f.manager.Free(f.a.session_token, "s");
  REQUIRE(freed.ok());
  CHECK(f.UsedBlocks() == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("a codebook layer parks until Fetch; Allocate asks for Fetch first", "[cpu]") {
  const bool repeat = GENERATE(false, true);
  Fixture f;
  f.Fill("s", 11);
  CompressParams params = Params("spindlekv", 0.5);
  params.policy.codebook_only_if_smaller = false;
  params.policy.gqa = repeat ? compress::GqaMode::kRepeat : compress::GqaMode::kGroupMean;
  auto r = f.manager.Compress(f.a.session_token, "s", params);
  REQUIRE(r.ok());
  for (const auto& l : r->layers) CHECK(l.codebook);
  CHECK(f.UsedBlocks() == 0);
  CHECK(r->bytes_after > 0);
  CHECK(r->bytes_after < r->bytes_before);
  REQUIRE(f.manager.CheckInvariants().ok());
  auto alloc = f.manager.Allocate(f.a.session_token, "s", 1);
  CHECK(alloc.status().code() == absl::StatusCode::kFailedPrecondition);
  // Fetch one layer only.
  auto one = f.manager.Fetch(f.a.session_token, "s", {1});
  REQUIRE(one.ok());
  REQUIRE(one->size() == 1);
  CHECK((*one)[0].new_blocks == (r->layers[1].num_tokens + kBlock - 1) / kBlock);
  CHECK(f.UsedBlocks() == (*one)[0].new_blocks);
  REQUIRE(f.manager.CheckInvariants().ok());
  CHECK(f.manager.Fetch(f.a.session_token, "s", {7}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  auto all = f.manager.Fetch(f.a.session_token, "s", {});
  REQUIRE(all.ok());
  for (uint32_t l = 0; l < kLayers; ++l) {
    const auto& fl = (*all)[l];
    CHECK(fl.new_blocks == (l == 1 ? 0u : (fl.num_tokens + kBlock - 1) / kBlock));
    CHECK(fl.num_tokens == r->layers[l].kept_per_head);
    for (uint32_t row = 0; row < fl.num_tokens; ++row) {
      for (uint32_t h = 0; h < kKvHeads; ++h) {
        const uint32_t tok = fl.positions[size_t{h} * fl.num_tokens + row];
        const uint32_t block = fl.block_ids[row / kBlock];
        CHECK(Cos(f.Head(l, kernels::KvPlane::kKey, block, row % kBlock, h),
                  &f.keys[l][(tok * kKvHeads + h) * kDim], kDim) > params.policy.theta_k - 1e-5);
        CHECK(Cos(f.Head(l, kernels::KvPlane::kValue, block, row % kBlock, h),
                  &f.values[l][(tok * kKvHeads + h) * kDim], kDim) > params.policy.theta_v - 1e-5);
      }
    }
  }
  REQUIRE(f.manager.Allocate(f.a.session_token, "s", 3).ok());
  REQUIRE(f.manager.CheckInvariants().ok());
  // A CUDA write event on a host pool is refused and parks nothing.
  const uint64_t used = f.UsedBlocks();
  auto evented = f.manager.Park(f.a.session_token, "s", {}, std::string(64, '\x01'));
  CHECK(evented.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(evented.status().message()), Catch::Contains("cuda_ipc_event_handle"));
  CHECK(f.UsedBlocks() == used);
  CHECK(f.manager.GetSequence(f.a.session_token, "s", false)->busy.empty());
  REQUIRE(f.manager.Park(f.a.session_token, "s", {}).ok());
  CHECK(f.UsedBlocks() < used);
  REQUIRE(f.manager.CheckInvariants().ok());
  REQUIRE(f.manager.Free(f.a.session_token, "s").ok());
  CHECK(f.UsedBlocks() == 0);
}

TEST_CASE("once shutdown begins, Compress, Fetch and Park stop and change nothing", "[cpu]") {
  Fixture f;
  f.Fill("parked", 5);
  f.Fill("plain", 7);
  CompressParams params = Params("spindlekv", 0.5);
  params.policy.codebook_only_if_smaller = false;
  REQUIRE(f.manager.Compress(f.a.session_token, "parked", params).ok());
  const uint64_t used = f.UsedBlocks();
  const auto before = f.manager.GetSequence(f.a.session_token, "plain", true);
  REQUIRE(before.ok());

  f.manager.BeginShutdown();
  auto compressed = f.manager.Compress(f.a.session_token, "plain", params);
  REQUIRE(compressed.status().code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(compressed.status().message()),
             Catch::Contains("shutting down: Compress stopped"));
  auto fetched = f.manager.Fetch(f.a.session_token, "parked", {});
  REQUIRE(fetched.status().code() == absl::StatusCode::kUnavailable);
  auto parked = f.manager.Park(f.a.session_token, "parked", {});
  REQUIRE(parked.status().code() == absl::StatusCode::kUnavailable);

  CHECK(f.UsedBlocks() == used);
  const auto after = f.manager.GetSequence(f.a.session_token, "plain", true);
  REQUIRE(after.ok());
  CHECK(after->busy.empty());
  CHECK_FALSE(after->compressed);
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK(after->layers[l].kv_digest == before->layers[l].kv_digest);
    CHECK(f.manager.GetSequence(f.a.session_token, "parked", false)->layers[l].parked);
  }
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("failed Compress calls change nothing", "[cpu]") {
  Fixture f;
  f.Fill("s", 3);
  auto before = f.manager.GetSequence(f.a.session_token, "s", true);
  REQUIRE(before.ok());
  auto same = [&] {
    auto now = f.manager.GetSequence(f.a.session_token, "s", true);
    REQUIRE(now.ok());
    CHECK_FALSE(now->compressed);
    for (uint32_t l = 0; l < kLayers; ++l) {
      CHECK(now->layers[l].block_ids == before->layers[l].block_ids);
      CHECK(now->layers[l].kv_digest == before->layers[l].kv_digest);
    }
    REQUIRE(f.manager.CheckInvariants().ok());
  };
  auto expect = [&](const CompressParams& p, absl::StatusCode code, const std::string& field) {
    auto r = f.manager.Compress(f.a.session_token, "s", p);
    CHECK(r.status().code() == code);
    CHECK_THAT(std::string(r.status().message()), Catch::Contains(field));
    same();
  };
  CompressParams p = Params("spindlekv");
  p.policy.theta_k = 1.5f;
  expect(p, absl::StatusCode::kInvalidArgument, "policy.theta_k");
  p = Params("spindlekv");
  p.policy.theta_k = 0.0f;
  expect(p, absl::StatusCode::kInvalidArgument, "policy.theta_k");
  p = Params("snapkv", 0.0);
  expect(p, absl::StatusCode::kInvalidArgument, "target.reserve_ratio");
  p = Params("snapkv", -1.0);
  expect(p, absl::StatusCode::kInvalidArgument, "target.reserve_ratio");
  p = Params("snapkv");
  p.target.kind = compress::TargetKind::kByteRatio;
  p.target.value = 1.5;
  expect(p, absl::StatusCode::kInvalidArgument, "target.byte_ratio");
  p = Params("snapkv");
  p.target = {compress::TargetKind::kByteRatio, 1e-6};  // below what the window alone holds
  expect(p, absl::StatusCode::kOutOfRange, "target.byte_ratio");
  p = Params("snapkv");
  p.input = CompressInput::kWindowQueries;
  p.num_queries = 0;
  expect(p, absl::StatusCode::kInvalidArgument, "num_queries");
  p.num_queries = 1000;  // more than the buffer holds
  expect(p, absl::StatusCode::kInvalidArgument, "num_queries");
  p.num_queries = UINT32_MAX;  // more than the sequence has tokens (and than size math holds)
  expect(p, absl::StatusCode::kInvalidArgument, "num_queries");
  p = Params("snapkv");
  p.cuda_ipc_event_handle = std::string(64, '\x01');  // a host pool has no device events
  expect(p, absl::StatusCode::kInvalidArgument, "cuda_ipc_event_handle is for CUDA pools");
  p = Params("snapkv");
  p.input = CompressInput::kNone;  // snapkv needs scores
  CHECK_FALSE(f.manager.Compress(f.a.session_token, "s", p).ok());
  same();

  auto unknown = ResolvePreset("no-such-policy");
  CHECK(unknown.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(unknown.status().message()), Catch::Contains("policy.preset"));
  CHECK(ResolvePreset("")->name == "snapkv");  // the measured default (docs/QUALITY.md)

  // Another client's sequence.
  auto other = f.manager.Attach({"other", Model(), 0});
  REQUIRE(other.ok());
  auto denied = f.manager.Compress(other->session_token, "s", Params("snapkv"));
  CHECK(denied.status().code() == absl::StatusCode::kPermissionDenied);
  CHECK(f.manager.Fetch(other->session_token, "s", {}).status().code() ==
        absl::StatusCode::kPermissionDenied);
  same();

  // Shared with a fork whose compression needs more fresh blocks than are free: refused whole.
  REQUIRE(f.manager.Fork(f.a.session_token, "s", "child").ok());
  auto hog = f.manager.Allocate(f.a.session_token, "hog", kBlock * (64 - kTokens / kBlock));
  REQUIRE(hog.ok());
  auto full = f.manager.Compress(f.a.session_token, "child", Params("snapkv"));
  CHECK(full.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(full.status().message()), Catch::Contains("fresh blocks"));
  CHECK_FALSE(f.manager.GetSequence(f.a.session_token, "child", false)->compressed);
  same();
  REQUIRE(f.manager.Free(f.a.session_token, "hog").ok());
  REQUIRE(f.manager.Free(f.a.session_token, "child").ok());
  same();

  // Twice.
  REQUIRE(f.manager.Compress(f.a.session_token, "s", Params("snapkv")).ok());
  auto after = f.manager.GetSequence(f.a.session_token, "s", true);
  auto twice = f.manager.Compress(f.a.session_token, "s", Params("snapkv"));
  CHECK(twice.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(twice.status().message()), Catch::Contains("twice"));
  auto now = f.manager.GetSequence(f.a.session_token, "s", true);
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK(now->layers[l].block_ids == after->layers[l].block_ids);
    CHECK(now->layers[l].kv_digest == after->layers[l].kv_digest);
  }
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("a fork compresses into fresh blocks; the parent keeps its rows", "[cpu]") {
  const std::string preset = GENERATE("snapkv", "spindlekv", "fullkv");
  Fixture f;
  f.Fill("s", 19);
  const auto parent_before = f.manager.GetSequence(f.a.session_token, "s", true);
  REQUIRE(f.manager.Fork(f.a.session_token, "s", "c").ok());
  const uint64_t used_before = f.UsedBlocks();
  CompressParams params = Params(preset, 0.4);
  auto r = f.manager.Compress(f.a.session_token, "c", params);
  REQUIRE(r.ok());
  REQUIRE(f.manager.CheckInvariants().ok());
  // The fork's old references were all dropped, no block was freed (the parent holds them),
  // and the kept rows hold the original vectors.
  CHECK(r->blocks_released == 0);
  uint64_t fresh = 0;
  for (uint32_t l = 0; l < kLayers; ++l) {
    const auto& out = r->layers[l];
    if (out.codebook) continue;
    fresh += out.block_ids.size();
    for (uint32_t row = 0; row < out.num_tokens; ++row) {
      for (uint32_t h = 0; h < kKvHeads; ++h) {
        const uint32_t tok = out.kept_positions[size_t{h} * out.num_tokens + row];
        CHECK(std::memcmp(
                  f.Head(l, kernels::KvPlane::kKey, out.block_ids[row / kBlock], row % kBlock, h),
                  &f.keys[l][(tok * kKvHeads + h) * kDim], kDim * 4) == 0);
      }
    }
  }
  CHECK(f.UsedBlocks() == used_before + fresh);
  const auto parent_after = f.manager.GetSequence(f.a.session_token, "s", true);
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK(parent_after->layers[l].block_ids == parent_before->layers[l].block_ids);
    CHECK(parent_after->layers[l].kv_digest == parent_before->layers[l].kv_digest);
  }
  CHECK_FALSE(parent_after->compressed);
  // The parent compresses in place now that nothing shares its blocks.
  REQUIRE(f.manager.Free(f.a.session_token, "c").ok());
  REQUIRE(f.manager.Compress(f.a.session_token, "s", params).ok());
  REQUIRE(f.manager.CheckInvariants().ok());
  REQUIRE(f.manager.Free(f.a.session_token, "s").ok());
  CHECK(f.UsedBlocks() == 0);
}

TEST_CASE("a fork of a parked sequence reconstructs into its own blocks", "[cpu]") {
  Fixture f;
  f.Fill("s", 13);
  CompressParams params = Params("spindlekv", 0.5);
  params.policy.codebook_only_if_smaller = false;
  REQUIRE(f.manager.Compress(f.a.session_token, "s", params).ok());
  CHECK(f.UsedBlocks() == 0);
  auto child = f.manager.Fork(f.a.session_token, "s", "c");
  REQUIRE(child.ok());
  REQUIRE(f.manager.CheckInvariants().ok());
  auto fetched = f.manager.Fetch(f.a.session_token, "c", {});
  REQUIRE(fetched.ok());
  const uint64_t child_blocks = f.UsedBlocks();
  CHECK(child_blocks > 0);
  REQUIRE(f.manager.CheckInvariants().ok());
  // The parent is still parked; compressing the child again is refused.
  auto parent = f.manager.GetSequence(f.a.session_token, "s", false);
  for (const auto& l : parent->layers) CHECK(l.block_ids.empty());
  CHECK(f.manager.Compress(f.a.session_token, "c", params).status().code() ==
        absl::StatusCode::kFailedPrecondition);
  REQUIRE(f.manager.Free(f.a.session_token, "s").ok());
  CHECK(f.UsedBlocks() == child_blocks);
  CHECK(*f.manager.Free(f.a.session_token, "c") == child_blocks);
  CHECK(f.UsedBlocks() == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("a byte-ratio target is met within the library's tolerance", "[cpu]") {
  Fixture f;
  f.Fill("s", 17);
  CompressParams p = Params("snapkv");
  p.target = {compress::TargetKind::kByteRatio, 0.5};
  auto r = f.manager.Compress(f.a.session_token, "s", p);
  REQUIRE(r.ok());
  CHECK(std::abs(r->honest_ratio / 0.5 - 1) <= compress::kByteRatioTolerance);
  CHECK(r->bytes_after <= r->bytes_before);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("Compress with window queries from the input buffer", "[cpu]") {
  Fixture f;
  f.Fill("s", 5);
  const uint32_t nq = 4;
  std::mt19937 rng(9);
  std::normal_distribution<float> normal;
  std::vector<float> queries(size_t{kLayers} * nq * kQHeads * kDim);
  for (float& q : queries) q = normal(rng);
  std::memcpy(f.input.data(), queries.data(), queries.size() * 4);
  CompressParams p = Params("pyramidkv");
  p.input = CompressInput::kWindowQueries;
  p.num_queries = nq;
  auto r = f.manager.Compress(f.a.session_token, "s", p);
  REQUIRE(r.ok());
  uint32_t kept = 0;
  for (const auto& l : r->layers) kept += l.kept_per_head;
  CHECK(kept < kLayers * kTokens);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("dtype converters round to nearest even", "[cpu]") {
  using namespace kernels;
  for (float v : {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f, 0.333251953125f}) {
    CHECK(F16ToF32(F32ToF16(v)) == v);
  }
  CHECK(F32ToF16(1.0f) == 0x3c00);
  CHECK(F32ToF16(65520.0f) == 0x7c00);
  CHECK(F32ToF16(1.0f + 1.0f / 2048) == 0x3c00);  // tie: to even
  CHECK(F32ToF16(1.0f + 3.0f / 2048) == 0x3c02);  // tie: to even (up)
  CHECK(F32ToF16(2.98023224e-08f) == 0x0000);     // 2^-25: tie to zero
  CHECK(F32ToF16(2.98023259e-08f) == 0x0001);     // just above: smallest subnormal
  CHECK(F32ToBf16(1.0f) == 0x3f80);
  CHECK(F32ToBf16(Bf16ToF32(0x3f81)) == 0x3f81);
  CHECK(F32ToBf16(1.0f + 1.0f / 256) == 0x3f80);  // tie: to even
  CHECK(F32ToBf16(1.0f + 3.0f / 256) == 0x3f82);
  CHECK(std::isnan(F16ToF32(F32ToF16(std::nanf("")))));
  CHECK(std::isnan(Bf16ToF32(F32ToBf16(std::nanf("")))));
}

}  // namespace
}  // namespace cachemgr

namespace cachemgr {
namespace {

TEST_CASE("operator calls: Free and Compress of any client's sequence by an empty token", "[cpu]") {
  Fixture f;
  f.Fill("s", 29);
  Caller op;
  op.operator_credential = true;
  CompressParams queries = Params("snapkv");
  queries.input = CompressInput::kWindowQueries;
  queries.num_queries = 4;
  // Without the operator credential, an empty token is refused before anything is looked at.
  auto anonymous = f.manager.Compress("", "s", Params("streamingllm"));
  CHECK(anonymous.status().code() == absl::StatusCode::kPermissionDenied);
  CHECK_THAT(std::string(anonymous.status().message()), Catch::Contains("operator credential"));
  CHECK(f.manager.Free("", "s").status().code() == absl::StatusCode::kPermissionDenied);
  auto refused = f.manager.Compress(op, "s", queries);
  CHECK(refused.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains("input must be NONE"));
  CompressParams none = Params("streamingllm");
  none.input = CompressInput::kNone;
  none.cuda_ipc_event_handle = std::string(64, 'e');
  auto evented = f.manager.Compress(op, "s", none);
  CHECK(evented.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(evented.status().message()),
             Catch::Contains("cuda_ipc_event_handle must be empty for an operator Compress"));
  none.cuda_ipc_event_handle.clear();
  auto r = f.manager.Compress(op, "s", none);
  REQUIRE(r.ok());
  CHECK(r->blocks_released > 0);
  auto snap = f.manager.GetSequence(op, "s", false);
  REQUIRE(snap.ok());
  CHECK(snap->compressed);
  CHECK(snap->owner_client_id == f.a.client_id);  // still the owner's
  CHECK(f.manager.Free(op, "missing").status().code() == absl::StatusCode::kNotFound);
  REQUIRE(f.manager.Free(op, "s").ok());
  CHECK(f.UsedBlocks() == 0);
  CHECK(f.manager.Stats().clients[0].sequences == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("snapshots and stats report codebook layers and the arena", "[cpu]") {
  Fixture f;
  f.Fill("s", 31);
  CompressParams params = Params("spindlekv", 0.5);
  params.policy.codebook_only_if_smaller = false;
  auto r = f.manager.Compress(f.a.session_token, "s", params);
  REQUIRE(r.ok());
  auto snap = f.manager.GetSequence(f.a.session_token, "s", false);
  REQUIRE(snap.ok());
  uint64_t arena = 0;
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK(snap->layers[l].codebook);
    CHECK(snap->layers[l].parked);
    CHECK(snap->layers[l].key_codebook_size == r->layers[l].key_codebook_size);
    CHECK(snap->layers[l].arena_bytes > 0);
    arena += snap->layers[l].arena_bytes;
  }
  const StatsSnapshot stats = f.manager.Stats();
  CHECK(stats.pools[0].arena_bytes == arena);
  CHECK(stats.pools[0].compressed_sequences == 1);
  CHECK(r->bytes_after == arena);  // every layer parked: no blocks
}

}  // namespace
}  // namespace cachemgr
