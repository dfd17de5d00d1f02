// The host backend's compute calls: window scores next to the pool are the CPU twin's on the
// pool's rows (bit for bit), with precise errors that leave the output untouched.
#include "cachemgr/backend/host_backend.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <string>
#include <vector>

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

}  // namespace
}  // namespace cachemgr
