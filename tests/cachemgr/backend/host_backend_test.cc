// The host backend's compute calls: window scores next to the pool are the CPU twin's on the
// pool's rows (bit for bit), with precise errors that leave the output untouched.
#include "cachemgr/backend/host_backend.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cachemgr/compress/coded_layer.h"
#include "cachemgr/compress/rope.h"
#include "cachemgr/compress/scoring.h"

namespace cachemgr {
namespace {

constexpr uint32_t kBlocks = 12, kBlockSize = 4, kKvHeads = 2, kDim = 8, kQHeads = 4;

kernels::KvLayerLayout Layout() {
  kernels::KvLayerLayout layout;
  layout.num_blocks = kBlocks;
  layout.block_size = kBlockSize;
  layout.num_kv_heads = kKvHeads;
  layout.head_dim = kDim;
  layout.elem_bytes = 2;
  return layout;
}

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> out(n);
  for (float& x : out) x = normal(rng);
  return out;
}

TEST_CASE("host pool window scores are the CPU twin's on the pool's rows", "[cpu]") {
  for (const kernels::KvElemType type : {kernels::KvElemType::kF16, kernels::KvElemType::kBf16}) {
    CAPTURE(static_cast<int>(type));
    HostBackend backend;
    auto pool = backend.CreatePool("p", Layout(), type, /*num_layers=*/2);
    REQUIRE(pool.ok());
    PoolMemory& memory = **pool;
    CHECK(memory.similarity_graph() == nullptr);  // codebook graphs on the host's CPU pass

    // A sequence of 30 tokens scattered over blocks in no particular order.
    const uint32_t n = 30, nq = 5;
    const std::vector<uint32_t> blocks = {7, 2, 11, 0, 5, 9, 3, 8};
    std::vector<int64_t> slots(n);
    for (uint32_t t = 0; t < n; ++t)
      slots[t] = int64_t{blocks[t / kBlockSize]} * kBlockSize + t % kBlockSize;
    const size_t row = size_t{kKvHeads} * kDim;
    REQUIRE(
        memory.ScatterTokens(1, slots, Random(n * row, 1).data(), Random(n * row, 2).data()).ok());
    const std::vector<float> queries = Random(size_t{nq} * kQHeads * kDim, 3);

    std::vector<float> keys(n * row), values(n * row);
    REQUIRE(memory.GatherTokens(1, slots, keys.data(), values.data()).ok());
    compress::ModelShape shape;
    shape.num_layers = 1;
    shape.num_q_heads = kQHeads;
    shape.num_kv_heads = kKvHeads;
    shape.head_dim = kDim;
    std::vector<float> want;
    compress::AttentionColumnSums(shape, n, keys.data(), queries.data(), nq, &want);

    std::vector<float> got(size_t{kQHeads} * n, std::nanf(""));
    REQUIRE(memory.AttentionColumnSums(1, slots, kQHeads, queries.data(), nq, got.data()).ok());
    CHECK(got == want);
    // The other layer holds zeros: every key alike, so the scores differ.
    std::vector<float> zeros(got.size());
    REQUIRE(memory.AttentionColumnSums(0, slots, kQHeads, queries.data(), nq, zeros.data()).ok());
    CHECK(zeros != want);
  }
}

TEST_CASE("host pool window score errors name the argument and write nothing", "[cpu]") {
  HostBackend backend;
  auto pool = backend.CreatePool("p", Layout(), kernels::KvElemType::kF16, 1);
  REQUIRE(pool.ok());
  const PoolMemory& memory = **pool;
  std::vector<int64_t> slots = {0, 1, 2, 3, 4, 5};
  const std::vector<float> queries = Random(size_t{6} * kQHeads * kDim, 4);
  std::vector<float> sums(size_t{kQHeads} * slots.size(), -7.0f);
  auto error = [&](uint32_t layer, const std::vector<int64_t>& s, uint32_t hq, uint32_t nq) {
    const absl::Status status =
        memory.AttentionColumnSums(layer, s, hq, queries.data(), nq, sums.data());
    CHECK(status.code() == absl::StatusCode::kInvalidArgument);
    return std::string(status.message());
  };
  CHECK(error(1, slots, kQHeads, 2) == "layer out of range");
  CHECK(error(0, slots, kQHeads, 0) == "num_queries must be in [1, 6] (got 0)");
  CHECK(error(0, slots, kQHeads, 7) == "num_queries must be in [1, 6] (got 7)");
  CHECK(error(0, slots, 3, 2) == "num_q_heads 3 is not a multiple of the pool's 2 KV heads");
  CHECK(error(0, {}, kQHeads, 1) == "slots must not be empty");
  CHECK(error(0, {0, 1, int64_t{kBlocks} * kBlockSize}, kQHeads, 1).find("slot") !=
        std::string::npos);
  CHECK(memory.AttentionColumnSums(0, slots, kQHeads, nullptr, 1, sums.data()).code() ==
        absl::StatusCode::kInvalidArgument);
  for (float x : sums) CHECK(x == -7.0f);
}

TEST_CASE("host pool writes a coded layer as its CPU reconstruction; bad input writes nothing",
          "[cpu]") {
  HostBackend backend;
  auto pool = backend.CreatePool("p", Layout(), kernels::KvElemType::kF16, 1);
  REQUIRE(pool.ok());
  PoolMemory& memory = **pool;
  // Three rows of two heads: two entries per plane, one queued K vector (row 2, head 1).
  compress::CodedRows coded;
  coded.rows = 3;
  coded.num_kv_heads = kKvHeads;
  coded.head_dim = kDim;
  coded.key_entries = Random(3 * kDim, 5);
  coded.value_entries = Random(2 * kDim, 6);
  coded.key_refs = {0, 1, 1, 0, 0, 2};
  coded.value_refs = {1, 1, 0, 0, 1, 0};
  coded.key_magnitudes = {0.5f, 2.0f, 1.5f, 3.0f, 0.25f, 1.0f};
  coded.value_magnitudes = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f};
  coded.rope.style = compress::RopeStyle::kHalfSplit;
  coded.rope.head_dim = kDim;
  coded.angles = compress::ComputeRopeAngles(coded.rope, std::vector<uint32_t>{3, 9});
  coded.key_angle_rows = {0, 1, 1, 0, 1, compress::CodedRows::kNoRotation};
  const std::vector<int64_t> slots = {13, 2, 40};
  REQUIRE(memory.ScatterCodedRows(0, slots, coded).ok());

  std::vector<float> want_k, want_v;
  compress::ReconstructCodedRows(coded, &want_k, &want_v);
  // The queued vector is verbatim, the others rotated.
  CHECK(std::equal(want_k.end() - kDim, want_k.end(), coded.key_entries.end() - kDim));
  CHECK(want_k[0] != coded.key_entries[0] * 0.5f);
  const std::vector<int64_t> other = {20, 21, 22};
  REQUIRE(memory.ScatterTokens(0, other, want_k.data(), want_v.data()).ok());
  std::vector<float> got_k(want_k.size()), got_v(want_k.size()), ref_k(want_k.size()),
      ref_v(want_k.size());
  REQUIRE(memory.GatherTokens(0, slots, got_k.data(), got_v.data()).ok());
  REQUIRE(memory.GatherTokens(0, other, ref_k.data(), ref_v.data()).ok());
  CHECK(got_k == ref_k);
  CHECK(got_v == ref_v);

  // Refusals leave the pool as it was.
  const std::vector<uint32_t> table = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  const uint64_t before = *memory.DigestLayer(0, table, kBlocks * kBlockSize, KvDigest::kFnv1a64);
  auto refused = [&](const compress::CodedRows& bad, const std::vector<int64_t>& s) {
    const absl::Status status = memory.ScatterCodedRows(0, s, bad);
    CHECK(status.code() == absl::StatusCode::kInvalidArgument);
    CHECK(*memory.DigestLayer(0, table, kBlocks * kBlockSize, KvDigest::kFnv1a64) == before);
    return std::string(status.message());
  };
  CHECK(refused(coded, {1, 2}) == "coded rows hold 3 rows for 2 slots");
  compress::CodedRows bad = coded;
  bad.key_refs[4] = 3;
  CHECK(refused(bad, {1, 2, 3}) == "coded rows: ref 3 out of range");
  bad = coded;
  bad.key_angle_rows[0] = 2;
  CHECK(refused(bad, {1, 2, 3}) == "coded rows: angle row 2 out of range");
  bad = coded;
  bad.value_magnitudes.pop_back();
  CHECK(refused(bad, {1, 2, 3}) == "coded rows: array sizes do not match rows x heads");
  CHECK(refused(coded, {1, 2, -1}).find("slot") != std::string::npos);
  CHECK(memory.ScatterCodedRows(1, slots, coded).code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("both digests cover each token's K and V rows in block-table order", "[cpu]") {
  HostBackend backend;
  auto pool = backend.CreatePool("p", Layout(), kernels::KvElemType::kF16, /*num_layers=*/1);
  REQUIRE(pool.ok());
  PoolMemory& memory = **pool;
  const size_t row = size_t{kKvHeads} * kDim;
  const std::vector<int64_t> slots = {4, 5, 6, 7, 8, 9, 10, 11};  // blocks 1 and 2
  REQUIRE(
      memory.ScatterTokens(0, slots, Random(8 * row, 4).data(), Random(8 * row, 5).data()).ok());
  for (const KvDigest kind : {KvDigest::kFnv1a64, KvDigest::kXxh3}) {
    CAPTURE(static_cast<int>(kind));
    const std::vector<uint32_t> table = {1, 2}, swapped = {2, 1};
    const uint64_t digest = *memory.DigestLayer(0, table, 8, kind);
    CHECK(*memory.DigestLayer(0, table, 8, kind) == digest);    // a function of the rows
    CHECK(*memory.DigestLayer(0, swapped, 8, kind) != digest);  // and of their order
    CHECK(*memory.DigestLayer(0, table, 7, kind) != digest);    // and of every token
    // One changed value (token 5's V, in block 2) changes it.
    std::vector<float> k(row), v(row);
    REQUIRE(memory.GatherTokens(0, {&slots[5], 1}, k.data(), v.data()).ok());
    v[row - 1] += 1.0f;
    REQUIRE(memory.ScatterTokens(0, {&slots[5], 1}, k.data(), v.data()).ok());
    CHECK(*memory.DigestLayer(0, table, 8, kind) != digest);
    v[row - 1] -= 1.0f;
    REQUIRE(memory.ScatterTokens(0, {&slots[5], 1}, k.data(), v.data()).ok());
    CHECK(*memory.DigestLayer(0, table, 8, kind) == digest);
  }
  // Two different functions of the same bytes.
  const std::vector<uint32_t> table = {1, 2};
  CHECK(*memory.DigestLayer(0, table, 8, KvDigest::kFnv1a64) !=
        *memory.DigestLayer(0, table, 8, KvDigest::kXxh3));
}

}  // namespace
}  // namespace cachemgr
