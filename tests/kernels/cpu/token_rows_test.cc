// Gather / scatter of float32 token rows and in-place compaction, against explicit index math.
#include "kernels/cpu/token_rows.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "cachemgr/kernels/elem_convert.h"

namespace cachemgr::kernels {
namespace {

KvLayerLayout Layout(KvOrder order, uint32_t elem) {
  KvLayerLayout l;
  l.order = order;
  l.num_blocks = 6;
  l.block_size = 4;
  l.num_kv_heads = 3;
  l.head_dim = 5;
  l.elem_bytes = elem;
  return l;
}

// The value of (plane, slot, head, d), distinct for each and exact in fp16 and bf16: a 5-bit
// mantissa for the slot, the exponent for head and d, the sign for the plane.
float Value(int plane, int64_t slot, uint32_t head, uint32_t d) {
  const float mantissa = 1.0f + static_cast<float>(slot) / 32.0f;
  return (plane == 0 ? 1.0f : -1.0f) * std::ldexp(mantissa, static_cast<int>(head * 4 + d));
}

std::vector<std::byte> FilledLayer(const KvLayerLayout& l, KvElemType type) {
  std::vector<std::byte> layer(l.layer_bytes());
  for (int plane = 0; plane < 2; ++plane) {
    for (int64_t slot = 0; slot < int64_t{l.num_blocks} * l.block_size; ++slot) {
      for (uint32_t h = 0; h < l.num_kv_heads; ++h) {
        std::vector<float> head(l.head_dim);
        for (uint32_t d = 0; d < l.head_dim; ++d) head[d] = Value(plane, slot, h, d);
        FromF32(
            head.data(), l.elem_bytes, type == KvElemType::kBf16, l.head_dim,
            layer.data() + l.slot_offset(static_cast<KvPlane>(plane), slot) + h * l.head_bytes());
      }
    }
  }
  return layer;
}

TEST_CASE("gather and scatter float32 rows in every order and element type", "[cpu]") {
  const auto order = GENERATE(KvOrder::kFlashAttn, KvOrder::kFlashInfer);
  const auto type = GENERATE(KvElemType::kF16, KvElemType::kBf16, KvElemType::kF32);
  const KvLayerLayout l = Layout(order, type == KvElemType::kF32 ? 4 : 2);
  std::vector<std::byte> layer = FilledLayer(l, type);
  const std::vector<int64_t> slots = {7, 0, 23, 7, 12};
  const size_t row = size_t{l.num_kv_heads} * l.head_dim;
  std::vector<float> k(slots.size() * row, -1.0f), v(k.size(), -1.0f);
  REQUIRE(GatherTokensF32Cpu(l, type, layer.data(), slots, k.data(), v.data()).ok());
  for (size_t i = 0; i < slots.size(); ++i) {
    for (uint32_t h = 0; h < l.num_kv_heads; ++h) {
      for (uint32_t d = 0; d < l.head_dim; ++d) {
        CHECK(k[i * row + h * l.head_dim + d] == Value(0, slots[i], h, d));
        CHECK(v[i * row + h * l.head_dim + d] == Value(1, slots[i], h, d));
      }
    }
  }
  // Scatter the rows gathered from slots {7, 0} to slots {1, 2}; nothing else changes.
  std::vector<std::byte> before = layer;
  REQUIRE(ScatterTokensF32Cpu(l, type, layer.data(), std::vector<int64_t>{1, 2}, k.data(), v.data())
              .ok());
  std::vector<float> got(2 * row), got_v(2 * row);
  REQUIRE(GatherTokensF32Cpu(l, type, layer.data(), std::vector<int64_t>{1, 2}, got.data(),
                             got_v.data())
              .ok());
  CHECK(std::equal(got.begin(), got.end(), k.begin()));
  CHECK(std::equal(got_v.begin(), got_v.end(), v.begin()));
  for (int64_t slot : {0, 3, 7, 23}) {
    for (KvPlane plane : {KvPlane::kKey, KvPlane::kValue}) {
      CHECK(std::memcmp(layer.data() + l.slot_offset(plane, slot),
                        before.data() + l.slot_offset(plane, slot), l.token_bytes()) == 0);
    }
  }
}

TEST_CASE("gather and scatter refuse bad slots and types, touching nothing", "[cpu]") {
  const KvLayerLayout l = Layout(KvOrder::kFlashAttn, 2);
  std::vector<std::byte> layer = FilledLayer(l, KvElemType::kF16);
  const std::vector<std::byte> before = layer;
  std::vector<float> k(3 * 15, 7.0f), v(k.size(), 7.0f);
  auto bad = GatherTokensF32Cpu(l, KvElemType::kF16, layer.data(), std::vector<int64_t>{1, 24, 2},
                                k.data(), v.data());
  CHECK(bad.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(bad.message()), Catch::Contains("slots[1] = 24"));
  CHECK(k[0] == 7.0f);
  CHECK(ScatterTokensF32Cpu(l, KvElemType::kF16, layer.data(), std::vector<int64_t>{-1}, k.data(),
                            v.data())
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(ScatterTokensF32Cpu(l, KvElemType::kF32, layer.data(), std::vector<int64_t>{0}, k.data(),
                            v.data())
            .code() == absl::StatusCode::kInvalidArgument);  // 4-byte type, 2-byte layout
  CHECK(layer == before);
}

TEST_CASE("compaction moves each head's kept rows to the front, in place", "[cpu]") {
  const auto order = GENERATE(KvOrder::kFlashAttn, KvOrder::kFlashInfer);
  const KvLayerLayout l = Layout(order, 4);
  std::vector<std::byte> layer = FilledLayer(l, KvElemType::kF32);
  // A table of 5 blocks in scrambled order, 18 tokens; keep 7 rows per head.
  const std::vector<uint32_t> table = {4, 1, 5, 0, 2};
  const uint32_t tokens = 18, rows = 7;
  std::mt19937 rng(3);
  std::vector<uint32_t> kept;
  for (uint32_t h = 0; h < l.num_kv_heads; ++h) {
    std::vector<uint32_t> all(tokens);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(rows);
    std::sort(all.begin(), all.end());
    kept.insert(kept.end(), all.begin(), all.end());
  }
  auto slot = [&](uint32_t t) { return int64_t{table[t / 4]} * 4 + t % 4; };
  REQUIRE(CompactHeadsCpu(l, layer.data(), table, tokens, kept, rows).ok());
  for (uint32_t h = 0; h < l.num_kv_heads; ++h) {
    for (uint32_t r = 0; r < rows; ++r) {
      const uint32_t t = kept[h * rows + r];
      for (int plane = 0; plane < 2; ++plane) {
        const float* got = reinterpret_cast<const float*>(
            layer.data() + l.slot_offset(static_cast<KvPlane>(plane), slot(r)) +
            h * l.head_bytes());
        INFO("head " << h << " row " << r << " token " << t << " plane " << plane);
        for (uint32_t d = 0; d < l.head_dim; ++d) CHECK(got[d] == Value(plane, slot(t), h, d));
      }
    }
  }
}

TEST_CASE("compaction validates before it moves anything", "[cpu]") {
  const KvLayerLayout l = Layout(KvOrder::kFlashAttn, 4);
  std::vector<std::byte> layer = FilledLayer(l, KvElemType::kF32);
  const std::vector<std::byte> before = layer;
  const std::vector<uint32_t> table = {0, 1};
  auto expect = [&](std::vector<uint32_t> kept, uint32_t rows, uint32_t tokens,
                    std::vector<uint32_t> t, const std::string& what) {
    auto s = CompactHeadsCpu(l, layer.data(), t, tokens, kept, rows);
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(s.message()), Catch::Contains(what));
    CHECK(layer == before);
  };
  expect({0, 1, 2, 0, 1, 2, 1, 0, 2}, 3, 8, table, "kept[2][1]");   // descending
  expect({0, 1, 9, 0, 1, 2, 0, 1, 2}, 3, 8, table, "kept[0][2]");   // >= num_tokens
  expect({0, 1, 2}, 3, 8, table, "kept has 3");                     // one head's worth
  expect({0, 1, 2, 0, 1, 2, 0, 1, 2}, 3, 9, table, "block_table");  // needs 3 blocks
  expect({0, 1, 2, 0, 1, 2, 0, 1, 2}, 3, 8, {0, 6}, "block_table[1] = 6");
}

}  // namespace
}  // namespace cachemgr::kernels
