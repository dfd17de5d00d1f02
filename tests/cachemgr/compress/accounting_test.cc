#include "cachemgr/compress/accounting.h"

#include <catch2/catch.hpp>

namespace cachemgr::compress {
namespace {

ModelShape Shape(uint32_t elem_bytes = 2) {
  ModelShape shape;
  shape.num_layers = 2;
  shape.num_q_heads = 4;
  shape.num_kv_heads = 2;
  shape.head_dim = 8;
  shape.elem_bytes = elem_bytes;
  return shape;
}

Codebook MakeCodebook(uint32_t entries, uint32_t vectors) {
  Codebook codebook;
  codebook.dim = 8;
  codebook.entries.assign(static_cast<size_t>(entries) * 8, 0.0f);
  codebook.refs.assign(vectors, 0);
  codebook.magnitudes.assign(vectors, 1.0f);
  return codebook;
}

TEST_CASE("full and plain bytes", "[cpu]") {
  // 2 layers * 10 tokens * 2 KV heads * 8 dims * (K and V) * 2 bytes.
  CHECK(FullKvBytes(Shape(), 10) == 1280);
  // 2 KV heads * 5 kept * 8 * (K and V) * 2 bytes.
  CHECK(PlainLayerBytes(Shape(), 5) == 320);
  CHECK(PlainLayerBytes(Shape(4), 5) == 640);

  LayerResult plain;
  plain.kept_per_head = 5;
  CHECK(LayerBytes(Shape(), plain) == 320);
  // Eq. 15 for a plain layer is r1 = kept / l.
  CHECK(LayerEq15Ratio(Shape(), plain, 10) == Approx(0.5));
}

TEST_CASE("codebook bytes: entries, then a ref and a magnitude per vector", "[cpu]") {
  CHECK(CodebookRefBytes(65535) == 2);
  CHECK(CodebookRefBytes(65536) == 4);
  CHECK(CodebookPartBytes(3, 10, 8, 2) == 3 * 8 * 2 + 10 * (2 + 2));
  CHECK(CodebookPartBytes(70000, 1, 8, 2) == 70000ull * 16 + (4 + 2));

  // 2 KV heads * 5 kept = 10 vectors; K codebook 3 entries, V 4 entries.
  LayerResult layer;
  layer.kept_per_head = 5;
  layer.key_codebook = MakeCodebook(3, 10);
  layer.value_codebook = MakeCodebook(4, 10);
  CHECK(LayerBytes(Shape(), layer) == (48 + 40) + (64 + 40));
  // r1 = 5/10, r2 = (3 + 4) / 20, r3 = (8 + (16 + 16) / 16) / 8 = 1.25.
  CHECK(LayerEq15Ratio(Shape(), layer, 10) == Approx(0.5 * 0.35 * 1.25));
  // fp32: r3 = (8 + (16 + 32) / 32) / 8.
  CHECK(LayerEq15Ratio(Shape(4), layer, 10) == Approx(0.5 * 0.35 * (9.5 / 8)));

  // Per-KV-head parts: K parts of 1 and 2 entries, 5 vectors each.
  layer.key_entry_offsets = {0, 1, 3};
  layer.value_entry_offsets = {0, 4, 4};
  CHECK(LayerBytes(Shape(), layer) == (16 + 20) + (32 + 20) + (64 + 20) + (0 + 20));
}

}  // namespace
}  // namespace cachemgr::compress
