// KvLayerLayout offsets and the KV digest, checked against hand-computed values.
#include "cachemgr/kernels/kv_layout.h"

#include <catch2/catch.hpp>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cachemgr/kernels/kv_digest.h"

namespace cachemgr::kernels {
namespace {

// nb=3, bs=2, H=2, D=4, fp16: head 8 B, token 16 B, plane block 32 B, block 64 B, layer 192 B.
KvLayerLayout SmallLayout(KvOrder order) {
  KvLayerLayout l;
  l.order = order;
  l.num_blocks = 3;
  l.block_size = 2;
  l.num_kv_heads = 2;
  l.head_dim = 4;
  l.elem_bytes = 2;
  return l;
}

// Straightforward FNV-1a 64, written independently of kv_digest.h.
uint64_t ReferenceFnv(const std::vector<uint8_t>& bytes) {
  uint64_t h = 14695981039346656037ull;
  for (uint8_t b : bytes) {
    h ^= b;
    h *= 1099511628211ull;
  }
  return h;
}

TEST_CASE("KvLayerLayout sizes", "[cpu]") {
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    const KvLayerLayout l = SmallLayout(order);
    CHECK(l.head_bytes() == 8);
    CHECK(l.token_bytes() == 16);
    CHECK(l.plane_block_bytes() == 32);
    CHECK(l.block_bytes() == 64);
    CHECK(l.layer_bytes() == 192);
  }
  KvLayerLayout big;
  big.num_blocks = 1000;
  big.block_size = 16;
  big.num_kv_heads = 8;
  big.head_dim = 128;
  big.elem_bytes = 4;
  CHECK(big.token_bytes() == 4096);
  CHECK(big.plane_block_bytes() == 65536);
  CHECK(big.layer_bytes() == 131072000ull);
}

TEST_CASE("KvLayerLayout FlashAttn offsets", "[cpu]") {
  const KvLayerLayout l = SmallLayout(KvOrder::kFlashAttn);
  // [2, nb, bs, H, D]: K plane is bytes [0, 96), V plane [96, 192).
  CHECK(l.block_offset(KvPlane::kKey, 0) == 0);
  CHECK(l.block_offset(KvPlane::kKey, 1) == 32);
  CHECK(l.block_offset(KvPlane::kKey, 2) == 64);
  CHECK(l.block_offset(KvPlane::kValue, 0) == 96);
  CHECK(l.block_offset(KvPlane::kValue, 2) == 160);
  CHECK(l.token_offset(KvPlane::kKey, 1, 1) == 48);
  CHECK(l.token_offset(KvPlane::kValue, 1, 1) == 144);
  CHECK(l.head_offset(KvPlane::kKey, 2, 0, 1) == 72);
  CHECK(l.head_offset(KvPlane::kValue, 1, 1, 1) == 152);
  CHECK(l.slot_offset(KvPlane::kKey, 0) == 0);
  CHECK(l.slot_offset(KvPlane::kKey, 3) == 48);
  CHECK(l.slot_offset(KvPlane::kValue, 5) == 176);
}

TEST_CASE("KvLayerLayout FlashInfer offsets", "[cpu]") {
  const KvLayerLayout l = SmallLayout(KvOrder::kFlashInfer);
  // [nb, 2, bs, H, D]: block b's K at 64b, its V at 64b + 32.
  CHECK(l.block_offset(KvPlane::kKey, 0) == 0);
  CHECK(l.block_offset(KvPlane::kValue, 0) == 32);
  CHECK(l.block_offset(KvPlane::kKey, 1) == 64);
  CHECK(l.block_offset(KvPlane::kValue, 1) == 96);
  CHECK(l.block_offset(KvPlane::kKey, 2) == 128);
  CHECK(l.block_offset(KvPlane::kValue, 2) == 160);
  CHECK(l.token_offset(KvPlane::kKey, 1, 1) == 80);
  CHECK(l.token_offset(KvPlane::kValue, 1, 1) == 112);
  CHECK(l.head_offset(KvPlane::kKey, 2, 0, 1) == 136);
  CHECK(l.head_offset(KvPlane::kValue, 2, 1, 1) == 184);
  CHECK(l.slot_offset(KvPlane::kKey, 3) == 80);
  CHECK(l.slot_offset(KvPlane::kValue, 4) == 160);
}

TEST_CASE("KvLayerLayout slot_offset matches token_offset and tiles the tensor", "[cpu]") {
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    const KvLayerLayout l = SmallLayout(order);
    std::vector<int> covered(l.layer_bytes(), 0);
    const int64_t num_slots = int64_t{l.num_blocks} * l.block_size;
    for (int64_t slot = 0; slot < num_slots; ++slot) {
      for (KvPlane plane : {KvPlane::kKey, KvPlane::kValue}) {
        const size_t off = l.slot_offset(plane, slot);
        CHECK(off == l.token_offset(plane, static_cast<uint32_t>(slot / l.block_size),
                                    static_cast<uint32_t>(slot % l.block_size)));
        REQUIRE(off + l.token_bytes() <= l.layer_bytes());
        for (size_t i = 0; i < l.token_bytes(); ++i) ++covered[off + i];
      }
    }
    // Every byte of the layer belongs to exactly one (plane, slot) row.
    for (int c : covered) REQUIRE(c == 1);
  }
}

TEST_CASE("Fnv1a64 matches an independent loop and known vectors", "[cpu]") {
  CHECK(Fnv1a64(nullptr, 0) == 0xcbf29ce484222325ull);
  const std::string a = "a";
  CHECK(Fnv1a64(reinterpret_cast<const std::byte*>(a.data()), a.size()) == 0xaf63dc4c8601ec8cull);
  const std::string foobar = "foobar";
  CHECK(Fnv1a64(reinterpret_cast<const std::byte*>(foobar.data()), foobar.size()) ==
        0x85944171f73967e8ull);

  std::vector<uint8_t> buf(257);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<uint8_t>(i * 37 + 11);
  const auto* p = reinterpret_cast<const std::byte*>(buf.data());
  CHECK(Fnv1a64(p, buf.size()) == ReferenceFnv(buf));
  // Chaining = hashing the concatenation.
  CHECK(Fnv1a64(p + 100, buf.size() - 100, Fnv1a64(p, 100)) == ReferenceFnv(buf));
}

TEST_CASE("DigestLayerTokens hashes K then V row per token in block-table order", "[cpu]") {
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    const KvLayerLayout l = SmallLayout(order);
    std::vector<uint8_t> layer(l.layer_bytes());
    for (size_t i = 0; i < layer.size(); ++i) layer[i] = static_cast<uint8_t>(i * 131 + 7);
    auto* base = reinterpret_cast<std::byte*>(layer.data());
    const uint32_t table[] = {2, 0};  // 3 tokens: block 2 slots 0,1 then block 0 slot 0.
    const uint32_t num_tokens = 3;

    // Expected: concatenate the rows with hand-written offsets and hash them.
    const auto key_row = [&](uint32_t b, uint32_t s) -> size_t {
      return order == KvOrder::kFlashAttn ? (0 * 3 + b) * 32 + s * 16 : (b * 2 + 0) * 32 + s * 16;
    };
    const auto value_row = [&](uint32_t b, uint32_t s) -> size_t {
      return order == KvOrder::kFlashAttn ? (1 * 3 + b) * 32 + s * 16 : (b * 2 + 1) * 32 + s * 16;
    };
    std::vector<uint8_t> concat;
    const uint32_t rows[][2] = {{2, 0}, {2, 1}, {0, 0}};
    for (const auto& r : rows) {
      concat.insert(concat.end(), layer.begin() + key_row(r[0], r[1]),
                    layer.begin() + key_row(r[0], r[1]) + 16);
      concat.insert(concat.end(), layer.begin() + value_row(r[0], r[1]),
                    layer.begin() + value_row(r[0], r[1]) + 16);
    }
    const uint64_t digest = DigestLayerTokens(l, base, table, num_tokens);
    CHECK(digest == ReferenceFnv(concat));
    CHECK(DigestLayerTokens(l, base, table, 0) == 0xcbf29ce484222325ull);

    // Changing one byte inside a covered row changes the digest...
    layer[value_row(0, 0) + 5] ^= 0x01;
    CHECK(DigestLayerTokens(l, base, table, num_tokens) != digest);
    layer[value_row(0, 0) + 5] ^= 0x01;
    CHECK(DigestLayerTokens(l, base, table, num_tokens) == digest);
    // ...and a byte outside the covered tokens (block 0 slot 1, block 1) does not.
    layer[key_row(0, 1)] ^= 0xFF;
    layer[value_row(1, 0) + 3] ^= 0xFF;
    CHECK(DigestLayerTokens(l, base, table, num_tokens) == digest);
  }
}

}  // namespace
}  // namespace cachemgr::kernels
