// Compress and Fetch through the real daemon and the C++ client: KV written through the mapped
// pool, window queries through the input buffer; kept rows read back after Fetch.
#include "cachemgr/compress/compress.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <random>

#include "cachemgr/client/client.h"
#include "cachemgr/compress/rope.h"
#include "kernels/cpu/dtype_convert.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

constexpr uint32_t kLayers = 4, kQHeads = 8, kKvHeads = 4, kDim = 16, kBlock = 16, kTokens = 96;

client::AttachOptions Options(bool bf16 = false) {
  client::AttachOptions o;
  o.client_name = "compressor";
  o.model.name = "cmp-model";
  o.model.num_layers = kLayers;
  o.model.num_q_heads = kQHeads;
  o.model.num_kv_heads = kKvHeads;
  o.model.head_dim = kDim;
  o.model.dtype = bf16 ? client::DType::kBf16 : client::DType::kFp16;
  o.model.block_size = kBlock;
  o.model.layout = client::CacheLayout::kFlashInfer;
  o.model.rope.style = client::RopeStyle::kInterleaved;
  o.model.rope.theta = 10000.0;
  o.num_blocks = 64;
  return o;
}

double Cos(const std::vector<float>& a, const std::vector<float>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ab += double{a[i]} * b[i];
    aa += double{a[i]} * a[i];
    bb += double{b[i]} * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

TEST_CASE("Compress then Fetch keeps the kept rows and releases blocks", "[service]") {
  // Selection per KV head (group mean) or per query head (repeat, stored merged per KV head).
  const bool repeat = GENERATE(false, true);
  const bool bf16 = GENERATE(false, true);  // 16-bit storage: fp16 or bf16
  INFO("repeat " << repeat << " bf16 " << bf16);
  const auto to16 = [bf16](float x) { return bf16 ? kernels::F32ToBf16(x) : kernels::F32ToF16(x); };
  const auto to32 = [bf16](uint16_t x) {
    return bf16 ? kernels::Bf16ToF32(x) : kernels::F16ToF32(x);
  };
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  auto session = client::Session::Attach((*daemon)->socket_path(), Options(bf16));
  REQUIRE(session.ok());
  client::Session& s = **session;
  REQUIRE(s.input_buffer().size() == size_t{kLayers} * 64 * kQHeads * kDim);

  auto alloc = s.Allocate("seq", kTokens);
  REQUIRE(alloc.ok());
  // Layers 0-1: random vectors (codebooks do not pay); layers 2-3: a few directions per head
  // before RoPE (codebooks do). Stored K is post-RoPE, in fp16 or bf16.
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  compress::RopeParams rope;
  rope.head_dim = kDim;
  std::vector<uint32_t> positions(kTokens);
  for (uint32_t t = 0; t < kTokens; ++t) positions[t] = t;
  // Stored fp16 bits, [layer][t][h][d].
  std::vector<std::vector<uint16_t>> k16(kLayers), v16(kLayers);
  for (uint32_t l = 0; l < kLayers; ++l) {
    std::vector<float> k(size_t{kTokens} * kKvHeads * kDim), v(k.size());
    std::vector<float> dirs(3 * kKvHeads * kDim * 2);
    for (float& x : dirs) x = normal(rng);
    for (uint32_t t = 0; t < kTokens; ++t) {
      for (uint32_t h = 0; h < kKvHeads; ++h) {
        for (uint32_t d = 0; d < kDim; ++d) {
          const size_t i = (size_t{t} * kKvHeads + h) * kDim + d;
          if (l < 2) {
            k[i] = normal(rng);
            v[i] = normal(rng);
          } else {
            const float mag = 1.0f + 0.25f * static_cast<float>(t % 5);
            const size_t dk = ((t % 3) * kKvHeads + h) * kDim + d;
            k[i] = mag * (dirs[dk] + 0.002f * normal(rng));
            v[i] = mag * (dirs[3 * kKvHeads * kDim + dk] + 0.002f * normal(rng));
          }
        }
      }
    }
    REQUIRE(compress::ApplyRope(rope, positions, kKvHeads, absl::MakeSpan(k)).ok());
    k16[l].resize(k.size());
    v16[l].resize(v.size());
    for (size_t i = 0; i < k.size(); ++i) {
      k16[l][i] = to16(k[i]);
      v16[l][i] = to16(v[i]);
    }
    for (uint32_t t = 0; t < kTokens; ++t) {
      const int64_t slot = alloc->layers[l].slot_mapping[t];
      for (uint32_t h = 0; h < kKvHeads; ++h) {
        const size_t i = (size_t{t} * kKvHeads + h) * kDim;
        std::memcpy(s.pool().key<uint16_t>(l, slot / kBlock, slot % kBlock, h), &k16[l][i],
                    kDim * 2);
        std::memcpy(s.pool().value<uint16_t>(l, slot / kBlock, slot % kBlock, h), &v16[l][i],
                    kDim * 2);
      }
    }
  }
  // Window queries [L, nq, Hq, D].
  const uint32_t nq = 8;
  std::span<float> input = s.input_buffer();
  for (size_t i = 0; i < size_t{kLayers} * nq * kQHeads * kDim; ++i) input[i] = normal(rng);

  const uint64_t used_before = UsedBlocks(*stub);
  CHECK(used_before == kLayers * (kTokens / kBlock));
  client::CompressOptions options;
  options.policy.preset = "spindlekv";
  options.policy.window = 8;
  // Per KV head selection: with repeat, the paper's accounting counts a token kept by two query
  // heads twice while the codebook stores it once, so every layer would pay as a codebook.
  options.policy.gqa = repeat ? client::GqaMode::kRepeat : client::GqaMode::kGroupMean;
  options.target = 0.3;
  options.input = client::CompressInputSource::kWindowQueries;
  options.num_queries = nq;
  auto r = s.Compress("seq", options);
  REQUIRE(r.ok());
  REQUIRE(r->layers.size() == kLayers);
  CHECK(r->bytes_after < r->bytes_before);
  CHECK(r->blocks_released > 0);
  CHECK(UsedBlocks(*stub) == used_before - r->blocks_released);
  CHECK(UsedBlocks(*stub) < used_before);
  CHECK(AccountingBalances(*stub));
  uint32_t codebook_layers = 0;
  for (const auto& l : r->layers) codebook_layers += l.codebook ? 1 : 0;
  CHECK(codebook_layers >= 1);
  if (!repeat) CHECK(codebook_layers < kLayers);

  auto info = s.GetSequence("seq");
  REQUIRE(info.ok());
  CHECK(info->compressed);
  CHECK(info->compression_policy == "spindlekv");
  CHECK(info->kept_per_layer.size() == kLayers);

  // Twice: refused, nothing changes.
  auto twice = s.Compress("seq", options);
  CHECK(twice.status().code() == absl::StatusCode::kFailedPrecondition);
  client::CompressOptions bad = options;
  bad.policy.preset = "no-such";
  auto unknown = s.Compress("seq", bad);
  CHECK(unknown.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(unknown.status().message()), Catch::Contains("policy.preset"));

  auto fetched = s.Fetch("seq");
  REQUIRE(fetched.ok());
  REQUIRE(fetched->size() == kLayers);
  CHECK(AccountingBalances(*stub));
  const float theta_k = 0.98f, theta_v = 0.95f;  // spindlekv's
  for (uint32_t l = 0; l < kLayers; ++l) {
    const auto& fl = (*fetched)[l];
    INFO("layer " << l << " codebook " << r->layers[l].codebook);
    REQUIRE(fl.kept_positions.size() == size_t{kKvHeads} * fl.num_tokens);
    REQUIRE(fl.block_ids.size() == (fl.num_tokens + kBlock - 1) / kBlock);
    if (!r->layers[l].codebook) CHECK(fl.block_ids == r->layers[l].block_ids);
    for (uint32_t row = 0; row < fl.num_tokens; ++row) {
      for (uint32_t h = 0; h < kKvHeads; ++h) {
        const uint32_t tok = fl.kept_positions[size_t{h} * fl.num_tokens + row];
        const size_t i = (size_t{tok} * kKvHeads + h) * kDim;
        const uint16_t* k = s.pool().key<uint16_t>(l, fl.block_ids[row / kBlock], row % kBlock, h);
        const uint16_t* v =
            s.pool().value<uint16_t>(l, fl.block_ids[row / kBlock], row % kBlock, h);
        if (!r->layers[l].codebook) {
          CHECK(std::memcmp(k, &k16[l][i], kDim * 2) == 0);
          CHECK(std::memcmp(v, &v16[l][i], kDim * 2) == 0);
          continue;
        }
        std::vector<float> rk(kDim), ok(kDim), rv(kDim), ov(kDim);
        for (uint32_t d = 0; d < kDim; ++d) {
          rk[d] = to32(k[d]);
          ok[d] = to32(k16[l][i + d]);
          rv[d] = to32(v[d]);
          ov[d] = to32(v16[l][i + d]);
        }
        CHECK(Cos(rk, ok) > theta_k - 2e-3);
        CHECK(Cos(rv, ov) > theta_v - 2e-3);
      }
    }
  }
  // Fetch again: same tables, no new blocks.
  const uint64_t used = UsedBlocks(*stub);
  auto again = s.Fetch("seq");
  REQUIRE(again.ok());
  CHECK(UsedBlocks(*stub) == used);
  for (uint32_t l = 0; l < kLayers; ++l) CHECK((*again)[l].block_ids == (*fetched)[l].block_ids);

  auto freed = s.Free("seq");
  REQUIRE(freed.ok());
  CHECK(UsedBlocks(*stub) == 0);
  CHECK(AccountingBalances(*stub));
  REQUIRE(s.Detach().ok());
}

TEST_CASE("Compress errors name the request field and change nothing", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  auto session = client::Session::Attach((*daemon)->socket_path(), Options());
  REQUIRE(session.ok());
  client::Session& s = **session;
  REQUIRE(s.Allocate("seq", kTokens).ok());
  const uint64_t used = UsedBlocks(*stub);
  auto before = s.GetSequence("seq", /*include_kv_digest=*/true);
  REQUIRE(before.ok());
  auto expect = [&](const client::CompressOptions& o, absl::StatusCode code,
                    const std::string& field) {
    auto r = s.Compress("seq", o);
    CHECK(r.status().code() == code);
    CHECK_THAT(std::string(r.status().message()), Catch::Contains(field));
    auto now = s.GetSequence("seq", true);
    REQUIRE(now.ok());
    CHECK_FALSE(now->compressed);
    for (uint32_t l = 0; l < kLayers; ++l) {
      CHECK(now->layers[l].block_ids == before->layers[l].block_ids);
      CHECK(now->layers[l].kv_digest == before->layers[l].kv_digest);
    }
    CHECK(UsedBlocks(*stub) == used);
  };
  client::CompressOptions o;
  o.policy.preset = "snapkv";
  o.input = client::CompressInputSource::kScores;
  o.policy.theta_k = 1.5f;
  expect(o, absl::StatusCode::kInvalidArgument, "policy.theta_k");
  o.policy.theta_k.reset();
  o.target = 0.0;
  expect(o, absl::StatusCode::kInvalidArgument, "target.reserve_ratio");
  o.target = 0.3;
  o.input = client::CompressInputSource::kWindowQueries;
  o.num_queries = 100000;
  expect(o, absl::StatusCode::kInvalidArgument, "num_queries");
  o.policy.preset = "nope";
  expect(o, absl::StatusCode::kInvalidArgument, "policy.preset");

  // Raw request: an unknown enum value and a missing target.
  v1::CompressRequest raw;
  raw.set_sequence_id("seq");
  raw.mutable_policy()->set_gqa(static_cast<v1::GqaMode>(42));
  raw.set_reserve_ratio(0.3);
  {
    grpc::ClientContext ctx;
    v1::CompressResponse resp;
    const grpc::Status st = stub->Compress(&ctx, raw, &resp);
    CHECK(st.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK_THAT(st.error_message(), Catch::Contains("policy.gqa"));
  }
  raw.mutable_policy()->clear_gqa();
  raw.clear_reserve_ratio();
  {
    grpc::ClientContext ctx;
    v1::CompressResponse resp;
    const grpc::Status st = stub->Compress(&ctx, raw, &resp);
    CHECK(st.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK_THAT(st.error_message(), Catch::Contains("target"));
  }
  REQUIRE(s.Detach().ok());
}

}  // namespace
}  // namespace cachemgr::testing
