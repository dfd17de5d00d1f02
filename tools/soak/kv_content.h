// KvContent: the K/V bytes a chaos client writes, as a pure function of (seed, layer, position,
// plane, head), so that what a sequence must hold can be recomputed at any time instead of kept.
//
// Vectors are clustered, as real keys and values are: most are one of four fixed directions per
// (layer, head, plane) plus a little noise (pairwise cos ~0.99, so codebooks merge them), one in
// eight points anywhere, and every vector has a magnitude in [0.5, 2]. None is zero or
// non-finite, so compression and codebooks accept them.
//
// Thread safety: immutable after construction.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cachemgr/kernels/kv_layout.h"

namespace cachemgr::soak {

class KvContent {
 public:
  KvContent(uint32_t num_kv_heads, uint32_t head_dim, kernels::KvElemType elem_type);

  uint32_t head_dim() const { return head_dim_; }
  uint32_t num_kv_heads() const { return num_kv_heads_; }
  kernels::KvElemType elem_type() const { return elem_type_; }
  // Bytes of one head's vector in the pool's element type.
  size_t head_bytes() const { return size_t{head_dim_} * elem_bytes_; }

  // The vector (float32, head_dim_ values) as written: already rounded to the element type.
  void Vector(uint64_t seed, uint32_t layer, uint64_t position, kernels::KvPlane plane,
              uint32_t head, float* out) const;
  // The same, encoded in the element type (head_bytes() bytes).
  void Encoded(uint64_t seed, uint32_t layer, uint64_t position, kernels::KvPlane plane,
               uint32_t head, std::byte* out) const;
  // Decodes head_dim_ elements at `src` to float32.
  void Decode(const std::byte* src, float* out) const;

  // Writes the K and V rows (every head) of (seed, layer, position) at `key_row` / `value_row`
  // (token rows of the pool, head after head).
  void WriteRow(uint64_t seed, uint32_t layer, uint64_t position, std::byte* key_row,
                std::byte* value_row) const;

 private:
  // One of the four unit directions of (layer, head, plane), the same in every client.
  void Prototype(uint32_t layer, uint32_t head, kernels::KvPlane plane, uint32_t which,
                 float* out) const;

  uint32_t num_kv_heads_;
  uint32_t head_dim_;
  kernels::KvElemType elem_type_;
  uint32_t elem_bytes_;
};

// SplitMix64: the generator behind every seeded choice of the chaos client.
uint64_t SplitMix64(uint64_t* state);
// A uniform double in [0, 1) from `state`.
double UniformUnit(uint64_t* state);

}  // namespace cachemgr::soak
