// Compress and Fetch through the real daemon and the C++ client: KV written through the mapped
// pool, window queries through the input buffer; kept rows read back after Fetch.
#include "cachemgr/compress/compress.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <random>

#include "cachemgr/client/client.h"
#include "cachemgr/compress/rope.h"
#include "cachemgr/kernels/elem_convert.h"
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

// The KV of one sequence as written through the mapped pool: layers 0-1 random vectors
// (codebooks do not pay), layers 2-3 a few directions per head before RoPE (codebooks do);
// stored K is post-RoPE, in fp16 or bf16. Also window queries [L, nq, Hq, D] in the input buffer.
struct WrittenSequence {
  bool bf16 = false;
  std::vector<std::vector<uint16_t>> k16, v16;  // stored bits, [layer][t][h][d]

  uint16_t To16(float x) const { return bf16 ? kernels::F32ToBf16(x) : kernels::F32ToF16(x); }
  float To32(uint16_t x) const { return bf16 ? kernels::Bf16ToF32(x) : kernels::F16ToF32(x); }

  // Writes rows [first, first + count) of every layer at `slots[l]` (count entries each).
  void Write(client::Session& s, const std::vector<std::vector<int64_t>>& slots, uint32_t first,
             uint32_t count, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    compress::RopeParams rope;
    rope.head_dim = kDim;
    std::vector<uint32_t> positions(count);
    for (uint32_t t = 0; t < count; ++t) positions[t] = first + t;
    k16.resize(kLayers);
    v16.resize(kLayers);
    for (uint32_t l = 0; l < kLayers; ++l) {
      std::vector<float> k(size_t{count} * kKvHeads * kDim), v(k.size());
      std::vector<float> dirs(3 * kKvHeads * kDim * 2);
      std::mt19937 dir_rng(1000 + l);  // the same directions for every call
      for (float& x : dirs) x = normal(dir_rng);
      for (uint32_t i = 0; i < count; ++i) {
        const uint32_t t = first + i;
        for (uint32_t h = 0; h < kKvHeads; ++h) {
          for (uint32_t d = 0; d < kDim; ++d) {
            const size_t at = (size_t{i} * kKvHeads + h) * kDim + d;
            if (l < 2) {
              k[at] = normal(rng);
              v[at] = normal(rng);
            } else {
              const float mag = 1.0f + 0.25f * static_cast<float>(t % 5);
              const size_t dk = ((t % 3) * kKvHeads + h) * kDim + d;
              k[at] = mag * (dirs[dk] + 0.002f * normal(rng));
              v[at] = mag * (dirs[3 * kKvHeads * kDim + dk] + 0.002f * normal(rng));
            }
          }
        }
      }
      REQUIRE(compress::ApplyRope(rope, positions, kKvHeads, absl::MakeSpan(k)).ok());
      k16[l].resize((size_t{first} + count) * kKvHeads * kDim);
      v16[l].resize(k16[l].size());
      for (size_t i = 0; i < k.size(); ++i) {
        k16[l][size_t{first} * kKvHeads * kDim + i] = To16(k[i]);
        v16[l][size_t{first} * kKvHeads * kDim + i] = To16(v[i]);
      }
      for (uint32_t i = 0; i < count; ++i) {
        const int64_t slot = slots[l][i];
        const size_t at = (size_t{first + i} * kKvHeads) * kDim;
        for (uint32_t h = 0; h < kKvHeads; ++h) {
          std::memcpy(s.pool().key<uint16_t>(l, slot / kBlock, slot % kBlock, h),
                      &k16[l][at + h * kDim], kDim * 2);
          std::memcpy(s.pool().value<uint16_t>(l, slot / kBlock, slot % kBlock, h),
                      &v16[l][at + h * kDim], kDim * 2);
        }
      }
    }
  }

  static void WriteQueries(client::Session& s, uint32_t nq, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    std::span<float> input = s.input_buffer();
    for (size_t i = 0; i < size_t{kLayers} * nq * kQHeads * kDim; ++i) input[i] = normal(rng);
  }

  // Checks every row of `fetched` against what was written at its position: plain layers bit
  // for bit, codebook layers within the thresholds' angle.
  void CheckRows(client::Session& s, const std::vector<client::FetchedLayer>& fetched,
                 const std::vector<bool>& codebook, float theta_k, float theta_v) const {
    for (const client::FetchedLayer& fl : fetched) {
      const uint32_t l = fl.layer;
      INFO("layer " << l << " codebook " << codebook[l]);
      REQUIRE(fl.positions.size() == size_t{kKvHeads} * fl.num_tokens);
      REQUIRE(fl.block_ids.size() == (fl.num_tokens + kBlock - 1) / kBlock);
      for (uint32_t row = 0; row < fl.num_tokens; ++row) {
        for (uint32_t h = 0; h < kKvHeads; ++h) {
          const uint32_t tok = fl.positions[size_t{h} * fl.num_tokens + row];
          const size_t i = (size_t{tok} * kKvHeads + h) * kDim;
          const uint16_t* k =
              s.pool().key<uint16_t>(l, fl.block_ids[row / kBlock], row % kBlock, h);
          const uint16_t* v =
              s.pool().value<uint16_t>(l, fl.block_ids[row / kBlock], row % kBlock, h);
          if (!codebook[l]) {
            CHECK(std::memcmp(k, &k16[l][i], kDim * 2) == 0);
            CHECK(std::memcmp(v, &v16[l][i], kDim * 2) == 0);
            continue;
          }
          std::vector<float> rk(kDim), ok(kDim), rv(kDim), ov(kDim);
          for (uint32_t d = 0; d < kDim; ++d) {
            rk[d] = To32(k[d]);
            ok[d] = To32(k16[l][i + d]);
            rv[d] = To32(v[d]);
            ov[d] = To32(v16[l][i + d]);
          }
          CHECK(Cos(rk, ok) > theta_k - 2e-3);
          CHECK(Cos(rv, ov) > theta_v - 2e-3);
        }
      }
    }
  }
};

std::vector<std::vector<int64_t>> Slots(const client::Allocation& alloc) {
  std::vector<std::vector<int64_t>> slots;
  for (const auto& l : alloc.layers) slots.push_back(l.slot_mapping);
  return slots;
}

std::vector<bool> CodebookLayers(const client::CompressResult& r) {
  std::vector<bool> out;
  for (const auto& l : r.layers) out.push_back(l.codebook);
  return out;
}

TEST_CASE("Compress then Fetch keeps the kept rows and releases blocks", "[service]") {
  // Selection per KV head (group mean) or per query head (repeat, merged per KV head).
  const bool repeat = GENERATE(false, true);
  const bool bf16 = GENERATE(false, true);  // 16-bit storage: fp16 or bf16
  INFO("repeat " << repeat << " bf16 " << bf16);
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  auto session = client::Session::Attach((*daemon)->socket_path(), Options(bf16));
  REQUIRE(session.ok());
  client::Session& s = **session;
  REQUIRE(s.input_buffer().size() == size_t{kLayers} * 64 * kQHeads * kDim);

  auto alloc = s.Allocate("seq", kTokens);
  REQUIRE(alloc.ok());
  WrittenSequence written;
  written.bf16 = bf16;
  written.Write(s, Slots(*alloc), 0, kTokens, 42);
  const uint32_t nq = 8;
  WrittenSequence::WriteQueries(s, nq, 43);

  const uint64_t used_before = UsedBlocks(*stub);
  CHECK(used_before == kLayers * (kTokens / kBlock));
  client::CompressOptions options;
  options.policy.preset = "spindlekv";
  options.policy.window = 8;
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
  // The clustered layers pay as codebooks, the random ones do not.
  CHECK(codebook_layers >= 1);
  CHECK(codebook_layers < kLayers);

  auto info = s.GetSequence("seq");
  REQUIRE(info.ok());
  CHECK(info->compressed);
  CHECK(info->compression_policy == "spindlekv");
  CHECK(info->kept_per_layer.size() == kLayers);
  CHECK(info->busy.empty());

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
  for (uint32_t l = 0; l < kLayers; ++l) {
    if (!r->layers[l].codebook) CHECK((*fetched)[l].block_ids == r->layers[l].block_ids);
    CHECK((*fetched)[l].positions == r->layers[l].kept_positions);
  }
  written.CheckRows(s, *fetched, CodebookLayers(*r), 0.98f, 0.95f);  // spindlekv's thresholds
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

TEST_CASE("every preset runs through Compress and Fetch on the daemon", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  auto session = client::Session::Attach((*daemon)->socket_path(), Options());
  REQUIRE(session.ok());
  client::Session& s = **session;
  const std::vector<std::string> presets = {"fullkv",   "streamingllm", "h2o",
                                            "snapkv",   "pyramidkv",    "pyramidinfer",
                                            "zigzagkv", "codebook",     "spindlekv"};
  for (const std::string& preset : presets) {
    INFO("preset " << preset);
    const std::string id = "seq-" + preset;
    auto alloc = s.Allocate(id, kTokens);
    REQUIRE(alloc.ok());
    WrittenSequence written;
    written.Write(s, Slots(*alloc), 0, kTokens, 7);
    // H2O scores with every position's query; the others use an 8-query window.
    const uint32_t nq = preset == "h2o" ? 64 : 8;
    WrittenSequence::WriteQueries(s, nq, 8);
    const uint64_t used_before = UsedBlocks(*stub);
    client::CompressOptions options;
    options.policy.preset = preset;
    options.policy.window = 8;
    options.target = 0.4;
    options.input = client::CompressInputSource::kWindowQueries;
    options.num_queries = nq;
    auto r = s.Compress(id, options);
    REQUIRE(r.ok());
    CHECK(UsedBlocks(*stub) == used_before - r->blocks_released);
    CHECK(AccountingBalances(*stub));
    uint32_t kept = 0, codebooks = 0;
    for (const auto& l : r->layers) {
      kept += l.kept_per_head;
      codebooks += l.codebook ? 1 : 0;
    }
    if (preset == "fullkv") {
      CHECK(kept == kLayers * kTokens);
      CHECK(r->blocks_released == 0);
    } else if (preset == "codebook") {
      CHECK(kept == kLayers * kTokens);  // codebook-only keeps every token...
      CHECK(codebooks >= 1);             // ...and codes the layers where that pays
    } else {
      CHECK(kept < kLayers * kTokens);
      CHECK(r->blocks_released > 0);
    }
    const bool codes = preset == "codebook" || preset == "spindlekv";
    if (!codes) CHECK(codebooks == 0);
    auto fetched = s.Fetch(id);
    REQUIRE(fetched.ok());
    CHECK(AccountingBalances(*stub));
    written.CheckRows(s, *fetched, CodebookLayers(*r), 0.98f, 0.95f);
    REQUIRE(s.Free(id).ok());
    CHECK(UsedBlocks(*stub) == 0);
  }
  REQUIRE(s.Detach().ok());
}

// A daemon with one session and its sequence "seq": kTokens tokens written (seeds `seed`), 8
// window queries in the input buffer (seed + 1); `options` a spindlekv Compress on them.
struct PrefilledSession {
  explicit PrefilledSession(uint32_t seed) {
    auto d = DaemonProcess::Start();
    REQUIRE(d.ok());
    daemon = *std::move(d);
    stub = RawStub(daemon->socket_path());
    auto attached = client::Session::Attach(daemon->socket_path(), Options());
    REQUIRE(attached.ok());
    session = *std::move(attached);
    auto alloc = session->Allocate("seq", kTokens);
    REQUIRE(alloc.ok());
    written.Write(*session, Slots(*alloc), 0, kTokens, seed);
    WrittenSequence::WriteQueries(*session, 8, seed + 1);
    options.policy.preset = "spindlekv";
    options.policy.window = 8;
    options.input = client::CompressInputSource::kWindowQueries;
    options.num_queries = 8;
  }
  std::unique_ptr<DaemonProcess> daemon;
  std::unique_ptr<v1::CacheManager::Stub> stub;
  std::unique_ptr<client::Session> session;
  WrittenSequence written;
  client::CompressOptions options;
};

TEST_CASE("decoding on a compressed sequence: Fetch, append, Park, Fetch", "[service]") {
  PrefilledSession p(11);
  client::Session& s = *p.session;
  auto& stub = p.stub;
  WrittenSequence& written = p.written;
  client::CompressOptions options = p.options;
  options.policy.append_batch = 8;
  options.target = 0.5;
  auto r = s.Compress("seq", options);
  REQUIRE(r.ok());
  const std::vector<bool> codebook = CodebookLayers(*r);
  auto fetched = s.Fetch("seq");
  REQUIRE(fetched.ok());

  // Decode 12 tokens, one Allocate each, written at their slots (clustered layers continue
  // their directions, so most appended vectors join existing entries).
  constexpr uint32_t kDecode = 12;
  std::vector<std::vector<int64_t>> slots(kLayers);
  for (uint32_t i = 0; i < kDecode; ++i) {
    auto step = s.Allocate("seq", 1);
    REQUIRE(step.ok());
    CHECK(step->first_position == kTokens + i);
    for (uint32_t l = 0; l < kLayers; ++l) slots[l].push_back(step->layers[l].slot_mapping[0]);
  }
  written.Write(s, slots, kTokens, kDecode, 13);
  CHECK(AccountingBalances(*stub));
  const uint64_t used = UsedBlocks(*stub);

  auto parked = s.Park("seq");
  REQUIRE(parked.ok());
  uint32_t parked_layers = 0, blocks_released = 0;
  for (const client::ParkedLayer& p : *parked) {
    INFO("layer " << p.layer);
    REQUIRE(codebook[p.layer]);
    ++parked_layers;
    blocks_released += p.blocks_released;
    CHECK(p.rows_appended == kDecode);
    CHECK(p.num_tokens == r->layers[p.layer].num_tokens + kDecode);
    CHECK(p.matched + p.queued == kDecode * kKvHeads * 2);
    CHECK(p.matched > p.queued);  // the clustered layers' directions repeat
    CHECK(p.arena_bytes > 0);
  }
  CHECK(parked_layers == std::count(codebook.begin(), codebook.end(), true));
  CHECK(UsedBlocks(*stub) == used - blocks_released);
  CHECK(AccountingBalances(*stub));
  // Parked layers take no appends until fetched again.
  CHECK(s.Allocate("seq", 1).status().code() == absl::StatusCode::kFailedPrecondition);

  auto refetched = s.Fetch("seq");
  REQUIRE(refetched.ok());
  for (const client::FetchedLayer& fl : *refetched) {
    CHECK(fl.num_tokens == r->layers[fl.layer].num_tokens + kDecode);
    // The appended rows sit after the compressed ones, at positions kTokens...
    for (uint32_t h = 0; h < kKvHeads; ++h) {
      CHECK(fl.positions[size_t{h} * fl.num_tokens + fl.num_tokens - 1] == kTokens + kDecode - 1);
    }
  }
  written.CheckRows(s, *refetched, codebook, 0.98f, 0.95f);
  CHECK(AccountingBalances(*stub));

  // Park errors name the field and change nothing.
  const uint64_t used_now = UsedBlocks(*stub);
  auto range = s.Park("seq", {kLayers});
  CHECK(range.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(range.status().message()), Catch::Contains("layers[0]"));
  auto fetch_range = s.Fetch("seq", {0, 0});
  CHECK(fetch_range.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(UsedBlocks(*stub) == used_now);
  REQUIRE(s.Free("seq").ok());
  CHECK(UsedBlocks(*stub) == 0);
  REQUIRE(s.Detach().ok());
}

TEST_CASE("a background Compress through the daemon: decoding goes on meanwhile", "[service]") {
  PrefilledSession p(7);
  client::Session& s = *p.session;
  auto& stub = p.stub;
  WrittenSequence& written = p.written;
  client::CompressOptions options = p.options;
  options.target = 0.3;
  options.background = true;
  auto started = s.Compress("seq", options);
  REQUIRE(started.ok());
  CHECK(started->pending);
  CHECK(started->layers.empty());
  auto info = s.GetSequence("seq");
  REQUIRE(info.ok());
  CHECK(info->compress_pending);
  CHECK_FALSE(info->compressed);

  // Five decode steps while the daemon works.
  constexpr uint32_t kSteps = 5;
  for (uint32_t i = 0; i < kSteps; ++i) {
    auto step = s.Allocate("seq", 1);
    REQUIRE(step.ok());
    written.Write(s, Slots(*step), kTokens + i, 1, 100 + i);
  }
  auto done = s.FinishCompress("seq");
  REQUIRE(done.ok());
  CHECK_FALSE(done->pending);
  CHECK(done->rows_appended == kSteps);
  CHECK(done->bytes_after < done->bytes_before);
  CHECK(AccountingBalances(*stub));
  auto fetched = s.Fetch("seq");
  REQUIRE(fetched.ok());
  for (uint32_t l = 0; l < kLayers; ++l) {
    const client::FetchedLayer& fl = (*fetched)[l];
    REQUIRE(fl.num_tokens == done->layers[l].kept_per_head + kSteps);
    CHECK(fl.positions == done->layers[l].kept_positions);
    for (uint32_t i = 0; i < kSteps; ++i)
      CHECK(fl.positions[fl.num_tokens - kSteps + i] == kTokens + i);
  }
  written.CheckRows(s, *fetched, CodebookLayers(*done), 0.98f, 0.95f);
  info = s.GetSequence("seq");
  REQUIRE(info.ok());
  CHECK(info->compressed);
  CHECK_FALSE(info->compress_pending);

  // Errors name what is wrong and change nothing.
  auto none = s.FinishCompress("seq");
  CHECK(none.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(none.status().message()), Catch::Contains("no background Compress"));
  auto unknown = s.FinishCompress("nope");
  CHECK(unknown.status().code() == absl::StatusCode::kNotFound);
  CHECK_THAT(std::string(unknown.status().message()), Catch::Contains("sequence_id"));
  REQUIRE(s.Allocate("other", 16).ok());
  v1::CompressRequest raw;
  raw.set_sequence_id("other");
  raw.set_reserve_ratio(0.5);
  raw.mutable_policy()->set_preset("streamingllm");
  raw.set_input(v1::INPUT_SOURCE_NONE);
  raw.set_background(true);
  {
    grpc::ClientContext ctx;
    AddOperatorCredential(ctx, p.daemon->socket_path());
    v1::CompressResponse resp;
    const grpc::Status st = stub->Compress(&ctx, raw, &resp);
    CHECK(st.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK_THAT(st.error_message(), Catch::Contains("background"));
  }
  v1::FinishCompressRequest finish;
  finish.set_sequence_id("other");
  finish.set_session_token("not-a-session");
  {
    grpc::ClientContext ctx;
    v1::CompressResponse resp;
    const grpc::Status st = stub->FinishCompress(&ctx, finish, &resp);
    CHECK(st.error_code() != grpc::StatusCode::OK);
  }
  auto other = s.GetSequence("other");
  REQUIRE(other.ok());
  CHECK_FALSE(other->compress_pending);
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
  raw.mutable_policy()->set_codebook_search(static_cast<v1::CodebookSearch>(7));
  {
    grpc::ClientContext ctx;
    v1::CompressResponse resp;
    const grpc::Status st = stub->Compress(&ctx, raw, &resp);
    CHECK(st.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK_THAT(st.error_message(), Catch::Contains("policy.codebook_search"));
  }
  raw.mutable_policy()->clear_codebook_search();
  raw.clear_reserve_ratio();
  {
    grpc::ClientContext ctx;
    v1::CompressResponse resp;
    const grpc::Status st = stub->Compress(&ctx, raw, &resp);
    CHECK(st.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK_THAT(st.error_message(), Catch::Contains("target"));
  }
  // A CUDA write event: the operator has none, and a host pool needs none.
  raw.set_reserve_ratio(0.3);
  raw.set_cuda_ipc_event_handle(std::string(64, '\x02'));
  {
    grpc::ClientContext ctx;
    AddOperatorCredential(ctx, (*daemon)->socket_path());
    v1::CompressResponse resp;
    const grpc::Status st = stub->Compress(&ctx, raw, &resp);
    CHECK(st.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK_THAT(st.error_message(), Catch::Contains("cuda_ipc_event_handle must be empty"));
  }
  const absl::Status record = s.RecordKvWrites(nullptr);
  CHECK(record.code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(record.message()), Catch::Contains("host memory"));
  auto now = s.GetSequence("seq", true);
  REQUIRE(now.ok());
  CHECK_FALSE(now->compressed);
  CHECK(UsedBlocks(*stub) == used);
  REQUIRE(s.Detach().ok());
}

}  // namespace
}  // namespace cachemgr::testing
