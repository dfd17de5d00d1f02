// Seeded synthetic sequences for the compression tests: random or clustered K/V (keys rotated
// at their positions, so a codebook only finds the clusters if it un-rotates), random queries.
#pragma once

#include <catch2/catch.hpp>
#include <cstdint>
#include <random>
#include <vector>

#include "cachemgr/compress/compress.h"
#include "cachemgr/compress/rope.h"

namespace cachemgr::compress {

inline ModelShape Shape(uint32_t layers = 3, uint32_t q_heads = 4, uint32_t kv_heads = 2,
                        uint32_t head_dim = 16) {
  ModelShape shape;
  shape.num_layers = layers;
  shape.num_q_heads = q_heads;
  shape.num_kv_heads = kv_heads;
  shape.head_dim = head_dim;
  shape.elem_bytes = 2;
  shape.rope_style = RopeStyle::kHalfSplit;
  shape.rope_theta = 10000.0;
  return shape;
}

// A sequence with owned storage. With clusters > 0, pre-RoPE keys and values are drawn from
// that many directions (times a magnitude in [0.5, 2], plus `noise`), then keys are rotated at
// their positions: the codebook can only find the clusters if it un-rotates correctly.
struct Sequence {
  ModelShape shape;
  std::vector<std::vector<float>> keys, values, queries, pre_rope_keys;
  SequenceInput input;
};

inline Sequence MakeSequence(const ModelShape& shape, uint32_t n, uint32_t num_queries,
                             uint32_t seed, uint32_t clusters = 0, float noise = 0.0f,
                             uint32_t position_offset = 0) {
  Sequence s;
  s.shape = shape;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> magnitude(0.5f, 2.0f);
  const uint32_t d = shape.head_dim;
  s.input.num_tokens = n;
  for (uint32_t t = 0; t < n; ++t) s.input.positions.push_back(position_offset + t);
  const RopeParams rope = RopeParamsFromShape(shape);
  for (uint32_t l = 0; l < shape.num_layers; ++l) {
    const size_t kv_size = static_cast<size_t>(n) * shape.num_kv_heads * d;
    std::vector<float> keys(kv_size), values(kv_size);
    if (clusters == 0) {
      for (float& v : keys) v = normal(rng);
      for (float& v : values) v = normal(rng);
    } else {
      std::vector<float> key_dirs(static_cast<size_t>(clusters) * d), value_dirs(key_dirs.size());
      for (float& v : key_dirs) v = normal(rng);
      for (float& v : value_dirs) v = normal(rng);
      for (size_t row = 0; row < kv_size / d; ++row) {
        const uint32_t ck = rng() % clusters;
        const uint32_t cv = rng() % clusters;
        const float mk = magnitude(rng);
        const float mv = magnitude(rng);
        for (uint32_t i = 0; i < d; ++i) {
          keys[row * d + i] = mk * key_dirs[ck * d + i] + noise * normal(rng);
          values[row * d + i] = mv * value_dirs[cv * d + i] + noise * normal(rng);
        }
      }
    }
    s.pre_rope_keys.push_back(keys);
    REQUIRE(ApplyRope(rope, s.input.positions, shape.num_kv_heads, absl::MakeSpan(keys)).ok());
    std::vector<float> queries(static_cast<size_t>(num_queries) * shape.num_q_heads * d);
    for (float& v : queries) v = normal(rng);
    s.keys.push_back(std::move(keys));
    s.values.push_back(std::move(values));
    s.queries.push_back(std::move(queries));
  }
  for (uint32_t l = 0; l < shape.num_layers; ++l) {
    LayerInput layer;
    layer.keys = s.keys[l].data();
    layer.values = s.values[l].data();
    layer.queries = num_queries > 0 ? s.queries[l].data() : nullptr;
    layer.num_queries = num_queries;
    s.input.layers.push_back(layer);
  }
  return s;
}

}  // namespace cachemgr::compress
