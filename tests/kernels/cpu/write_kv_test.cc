// WriteKvBySlotCpu against a reference written with explicit index math, and ReadKvBySlotCpu
// (its inverse) against both.
#include "kernels/cpu/write_kv.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace cachemgr::kernels {
namespace {

struct Shape {
  uint32_t nb, bs, heads, dim, elem;
};

KvLayerLayout MakeLayout(KvOrder order, const Shape& s) {
  KvLayerLayout l;
  l.order = order;
  l.num_blocks = s.nb;
  l.block_size = s.bs;
  l.num_kv_heads = s.heads;
  l.head_dim = s.dim;
  l.elem_bytes = s.elem;
  return l;
}

std::vector<std::byte> RandomBytes(size_t n, std::mt19937& rng) {
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng() & 0xFF);
  return v;
}

// Element index of (plane p, block b, slot-in-block s, head h, dim 0), by the layout formulas.
size_t RefElemIndex(KvOrder order, const Shape& sh, size_t p, size_t b, size_t s, size_t h) {
  const size_t H = sh.heads, D = sh.dim, nb = sh.nb, bs = sh.bs;
  if (order == KvOrder::kFlashAttn) return ((p * nb + b) * bs + s) * H * D + h * D;
  return ((b * 2 + p) * bs + s) * H * D + h * D;
}

// Reference scatter, element by element, head by head.
void RefWrite(KvOrder order, const Shape& sh, std::vector<std::byte>& layer,
              const std::vector<std::byte>& key, const std::vector<std::byte>& value,
              const std::vector<int64_t>& slots) {
  const size_t H = sh.heads, D = sh.dim, E = sh.elem;
  for (size_t t = 0; t < slots.size(); ++t) {
    if (slots[t] < 0) continue;
    const size_t b = static_cast<size_t>(slots[t]) / sh.bs;
    const size_t s = static_cast<size_t>(slots[t]) % sh.bs;
    for (size_t h = 0; h < H; ++h) {
      for (size_t d = 0; d < D; ++d) {
        const size_t src = ((t * H + h) * D + d) * E;
        for (size_t e = 0; e < E; ++e) {
          layer[(RefElemIndex(order, sh, 0, b, s, h) + d) * E + e] = key[src + e];
          layer[(RefElemIndex(order, sh, 1, b, s, h) + d) * E + e] = value[src + e];
        }
      }
    }
  }
}

TEST_CASE("WriteKvBySlotCpu matches the index-math reference", "[cpu]") {
  std::mt19937 rng(20240611);
  const Shape shapes[] = {{8, 4, 2, 8, 2}, {8, 4, 2, 8, 4}, {5, 16, 1, 64, 2}, {3, 3, 3, 5, 4}};
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    for (const Shape& sh : shapes) {
      CAPTURE(static_cast<int>(order), sh.nb, sh.bs, sh.heads, sh.dim, sh.elem);
      const KvLayerLayout l = MakeLayout(order, sh);
      const size_t num_slots = size_t{sh.nb} * sh.bs;
      const size_t row = size_t{sh.heads} * sh.dim * sh.elem;
      // Random distinct slots for about half the tensor, with padding tokens mixed in.
      std::vector<int64_t> perm(num_slots);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      std::vector<int64_t> slots(perm.begin(), perm.begin() + num_slots / 2);
      for (int i = 0; i < 3; ++i) slots.insert(slots.begin() + rng() % slots.size(), -1);
      const size_t num_tokens = slots.size();

      const std::vector<std::byte> key = RandomBytes(num_tokens * row, rng);
      const std::vector<std::byte> value = RandomBytes(num_tokens * row, rng);
      std::vector<std::byte> layer = RandomBytes(l.layer_bytes(), rng);
      std::vector<std::byte> expected = layer;
      RefWrite(order, sh, expected, key, value, slots);

      REQUIRE(WriteKvBySlotCpu(l, layer.data(), key.data(), value.data(), slots).ok());
      REQUIRE(layer == expected);
    }
  }
}

TEST_CASE("ReadKvBySlotCpu reads back what WriteKvBySlotCpu wrote, byte for byte", "[cpu]") {
  std::mt19937 rng(77);
  const Shape shapes[] = {{8, 4, 2, 8, 2}, {8, 4, 2, 8, 4}, {3, 3, 3, 5, 4}};
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    for (const Shape& sh : shapes) {
      CAPTURE(static_cast<int>(order), sh.nb, sh.bs, sh.heads, sh.dim, sh.elem);
      const KvLayerLayout l = MakeLayout(order, sh);
      const size_t num_slots = size_t{sh.nb} * sh.bs;
      std::vector<int64_t> slots(num_slots);
      std::iota(slots.begin(), slots.end(), 0);
      std::shuffle(slots.begin(), slots.end(), rng);
      slots.resize(num_slots / 2);
      slots[1] = -1;  // padding: its rows are left as they are
      const std::vector<std::byte> key = RandomBytes(slots.size() * l.token_bytes(), rng);
      const std::vector<std::byte> value = RandomBytes(key.size(), rng);
      std::vector<std::byte> layer = RandomBytes(l.layer_bytes(), rng);
      REQUIRE(WriteKvBySlotCpu(l, layer.data(), key.data(), value.data(), slots).ok());
      std::vector<std::byte> k(key.size(), std::byte{0xAB}), v(k);
      REQUIRE(ReadKvBySlotCpu(l, layer.data(), k.data(), v.data(), slots).ok());
      for (size_t t = 0; t < slots.size(); ++t) {
        const size_t at = t * l.token_bytes();
        const std::byte* want_k = slots[t] == -1 ? nullptr : key.data() + at;
        for (size_t i = 0; i < l.token_bytes(); ++i) {
          CHECK(k[at + i] == (want_k ? want_k[i] : std::byte{0xAB}));
          CHECK(v[at + i] == (want_k ? value[at + i] : std::byte{0xAB}));
        }
      }
      const std::vector<int64_t> bad = {0, static_cast<int64_t>(num_slots)};
      CHECK(ReadKvBySlotCpu(l, layer.data(), k.data(), v.data(), bad).code() ==
            absl::StatusCode::kInvalidArgument);
    }
  }
}

TEST_CASE("WriteKvBySlotCpu with only padding or no tokens writes nothing", "[cpu]") {
  std::mt19937 rng(3);
  const Shape sh{4, 4, 2, 8, 2};
  const KvLayerLayout l = MakeLayout(KvOrder::kFlashAttn, sh);
  std::vector<std::byte> layer = RandomBytes(l.layer_bytes(), rng);
  const std::vector<std::byte> before = layer;
  const std::vector<std::byte> rows = RandomBytes(2 * l.token_bytes(), rng);
  const std::vector<int64_t> padding = {-1, -1};
  CHECK(WriteKvBySlotCpu(l, layer.data(), rows.data(), rows.data(), padding).ok());
  CHECK(WriteKvBySlotCpu(l, layer.data(), nullptr, nullptr, {}).ok());
  CHECK(layer == before);
}

TEST_CASE("WriteKvBySlotCpu rejects bad input before writing anything", "[cpu]") {
  std::mt19937 rng(77);
  const Shape sh{4, 4, 2, 8, 4};  // 16 slots.
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    const KvLayerLayout l = MakeLayout(order, sh);
    struct Bad {
      std::vector<int64_t> slots;
      const char* message_part;
    };
    // The bad slot comes last so that a non-validating implementation would already have written.
    const std::vector<Bad> cases = {
        {{0, 5, 16}, "token 2: slot 16"},
        {{3, -1, 1000}, "token 2: slot 1000"},
        {{3, 7, -2}, "token 2: slot -2"},
        {{1, 2, INT64_MIN}, "token 2"},
    };
    for (const Bad& c : cases) {
      CAPTURE(static_cast<int>(order), c.message_part);
      std::vector<std::byte> layer = RandomBytes(l.layer_bytes(), rng);
      const std::vector<std::byte> before = layer;
      const std::vector<std::byte> rows = RandomBytes(c.slots.size() * l.token_bytes(), rng);
      const absl::Status s = WriteKvBySlotCpu(l, layer.data(), rows.data(), rows.data(), c.slots);
      CHECK(s.code() == absl::StatusCode::kInvalidArgument);
      CHECK_THAT(std::string(s.message()), Catch::Contains(c.message_part));
      CHECK(layer == before);
    }

    std::vector<std::byte> layer = RandomBytes(l.layer_bytes(), rng);
    const std::vector<std::byte> before = layer;
    const std::vector<std::byte> rows = RandomBytes(l.token_bytes(), rng);
    const std::vector<int64_t> one = {3};
    CHECK(WriteKvBySlotCpu(l, layer.data(), nullptr, rows.data(), one).code() ==
          absl::StatusCode::kInvalidArgument);
    CHECK(WriteKvBySlotCpu(l, layer.data(), rows.data(), nullptr, one).code() ==
          absl::StatusCode::kInvalidArgument);
    CHECK(WriteKvBySlotCpu(l, nullptr, rows.data(), rows.data(), one).code() ==
          absl::StatusCode::kInvalidArgument);
    KvLayerLayout bad = l;
    bad.block_size = 0;
    CHECK(WriteKvBySlotCpu(bad, layer.data(), rows.data(), rows.data(), one).code() ==
          absl::StatusCode::kInvalidArgument);
    CHECK(layer == before);
  }
}

}  // namespace
}  // namespace cachemgr::kernels
