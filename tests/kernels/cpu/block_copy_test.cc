// CopyBlocksCpu: copy-on-write block copies in both layouts, and validation that never writes.
#include "kernels/cpu/block_copy.h"

#include <catch2/catch.hpp>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace cachemgr::kernels {
namespace {

KvLayerLayout MakeLayout(KvOrder order, uint32_t elem_bytes) {
  KvLayerLayout l;
  l.order = order;
  l.num_blocks = 12;
  l.block_size = 4;
  l.num_kv_heads = 2;
  l.head_dim = 8;
  l.elem_bytes = elem_bytes;
  return l;
}

std::vector<std::byte> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng() & 0xFF);
  return v;
}

// Plane-block byte range in the tensor, written out per order (independent of block_offset).
size_t PlaneStart(const KvLayerLayout& l, int plane, uint32_t block) {
  const size_t pbb = size_t{l.block_size} * l.num_kv_heads * l.head_dim * l.elem_bytes;
  return l.order == KvOrder::kFlashAttn ? (size_t(plane) * l.num_blocks + block) * pbb
                                        : (size_t(block) * 2 + plane) * pbb;
}

TEST_CASE("CopyBlocksCpu copies both planes and leaves other blocks unchanged", "[cpu]") {
  uint32_t seed = 1234;
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    for (uint32_t elem : {2u, 4u}) {
      CAPTURE(static_cast<int>(order), elem);
      const KvLayerLayout l = MakeLayout(order, elem);
      const std::vector<std::byte> before = RandomBytes(l.layer_bytes(), seed++);
      std::vector<std::byte> layer = before;
      const std::vector<BlockCopyPair> pairs = {{0, 5}, {3, 7}, {3, 1}, {11, 10}, {2, 4}};
      REQUIRE(CopyBlocksCpu(l, layer.data(), pairs).ok());

      const size_t pbb = l.plane_block_bytes();
      std::vector<bool> is_dst(l.num_blocks, false);
      for (const BlockCopyPair& p : pairs) {
        is_dst[p.dst] = true;
        for (int plane = 0; plane < 2; ++plane) {
          for (size_t i = 0; i < pbb; ++i) {
            REQUIRE(layer[PlaneStart(l, plane, p.dst) + i] ==
                    before[PlaneStart(l, plane, p.src) + i]);
          }
        }
      }
      for (uint32_t b = 0; b < l.num_blocks; ++b) {
        if (is_dst[b]) continue;
        for (int plane = 0; plane < 2; ++plane) {
          for (size_t i = 0; i < pbb; ++i) {
            REQUIRE(layer[PlaneStart(l, plane, b) + i] == before[PlaneStart(l, plane, b) + i]);
          }
        }
      }
    }
  }
}

TEST_CASE("CopyBlocksCpu with no pairs is a no-op", "[cpu]") {
  const KvLayerLayout l = MakeLayout(KvOrder::kFlashAttn, 2);
  std::vector<std::byte> layer = RandomBytes(l.layer_bytes(), 7);
  const std::vector<std::byte> before = layer;
  CHECK(CopyBlocksCpu(l, layer.data(), {}).ok());
  CHECK(layer == before);
}

struct BadCase {
  const char* name;
  std::vector<BlockCopyPair> pairs;
  const char* message_part;
};

TEST_CASE("CopyBlocksCpu rejects bad pairs before copying anything", "[cpu]") {
  const std::vector<BadCase> cases = {
      {"src out of range", {{0, 1}, {12, 2}}, "copy pair 1: src block 12"},
      {"dst out of range", {{0, 1}, {2, 3}, {4, 400}}, "copy pair 2: dst block 400"},
      {"src == dst", {{0, 1}, {6, 6}}, "copy pair 1: src and dst are both block 6"},
      {"duplicate dst", {{0, 1}, {2, 3}, {4, 1}}, "dst block 1 is also the dst of pair 0"},
      {"dst is also a src (chain)", {{0, 1}, {1, 2}}, "dst block 1 is also the src of pair 1"},
      {"dst is a later pair's src", {{5, 9}, {3, 4}, {9, 10}}, "is also the src of pair 2"},
      {"swap", {{3, 4}, {4, 3}}, "is also the src of pair"},
  };
  uint32_t seed = 99;
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    for (uint32_t elem : {2u, 4u}) {
      const KvLayerLayout l = MakeLayout(order, elem);
      for (const BadCase& c : cases) {
        CAPTURE(c.name, static_cast<int>(order), elem);
        std::vector<std::byte> layer = RandomBytes(l.layer_bytes(), seed++);
        const std::vector<std::byte> before = layer;
        const absl::Status s = CopyBlocksCpu(l, layer.data(), c.pairs);
        CHECK(s.code() == absl::StatusCode::kInvalidArgument);
        CHECK_THAT(std::string(s.message()), Catch::Contains(c.message_part));
        CHECK(layer == before);
        CHECK(ValidateBlockCopyPairs(l, c.pairs).code() == absl::StatusCode::kInvalidArgument);
      }
    }
  }
}

TEST_CASE("CopyBlocksCpu rejects a bad layout or null tensor", "[cpu]") {
  KvLayerLayout l = MakeLayout(KvOrder::kFlashInfer, 2);
  const std::vector<BlockCopyPair> pairs = {{0, 1}};
  CHECK(CopyBlocksCpu(l, nullptr, pairs).code() == absl::StatusCode::kInvalidArgument);
  std::vector<std::byte> layer = RandomBytes(l.layer_bytes(), 5);
  const std::vector<std::byte> before = layer;
  l.head_dim = 0;
  const absl::Status s = CopyBlocksCpu(l, layer.data(), pairs);
  CHECK(s.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(s.message()), Catch::Contains("head_dim"));
  l.head_dim = 8;
  l.order = static_cast<KvOrder>(7);
  CHECK(CopyBlocksCpu(l, layer.data(), pairs).code() == absl::StatusCode::kInvalidArgument);
  CHECK(layer == before);
}

}  // namespace
}  // namespace cachemgr::kernels
