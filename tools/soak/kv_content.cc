#include "tools/soak/kv_content.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "cachemgr/kernels/elem_convert.h"

namespace cachemgr::soak {

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double UniformUnit(uint64_t* state) { return (SplitMix64(state) >> 11) * 0x1.0p-53; }

namespace {

// A standard normal draw (Box-Muller; the first uniform is kept away from 0).
float Gaussian(uint64_t* state) {
  const double u1 = (static_cast<double>(SplitMix64(state) >> 11) + 1.0) * 0x1.0p-53;
  const double u2 = UniformUnit(state);
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
}

uint64_t Mix(uint64_t seed, uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  uint64_t state = seed * 0x9e3779b97f4a7c15ull;
  state ^= (a + 1) * 0xc2b2ae3d27d4eb4full;
  state ^= (b + 1) * 0x165667b19e3779f9ull;
  state ^= (c + 1) * 0xd6e8feb86659fd93ull;
  state ^= (d + 1) * 0x27d4eb2f165667c5ull;
  SplitMix64(&state);
  return state;
}

void Normalize(float* v, uint32_t n) {
  double sum = 0;
  for (uint32_t i = 0; i < n; ++i) sum += double{v[i]} * v[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(sum > 0 ? sum : 1.0));
  for (uint32_t i = 0; i < n; ++i) v[i] *= inv;
}

}  // namespace

KvContent::KvContent(uint32_t num_kv_heads, uint32_t head_dim, kernels::KvElemType elem_type)
    : num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      elem_type_(elem_type),
      elem_bytes_(elem_type == kernels::KvElemType::kF32 ? 4 : 2) {}

void KvContent::Prototype(uint32_t layer, uint32_t head, kernels::KvPlane plane, uint32_t which,
                          float* out) const {
  uint64_t state = Mix(0x50a4, layer, head, static_cast<uint64_t>(plane), which);
  for (uint32_t i = 0; i < head_dim_; ++i) out[i] = Gaussian(&state);
  Normalize(out, head_dim_);
}

void KvContent::Vector(uint64_t seed, uint32_t layer, uint64_t position, kernels::KvPlane plane,
                       uint32_t head, float* out) const {
  uint64_t state = Mix(seed, layer, position, static_cast<uint64_t>(plane), head);
  const uint64_t kind = SplitMix64(&state);
  if (kind % 8 == 0) {
    for (uint32_t i = 0; i < head_dim_; ++i) out[i] = Gaussian(&state);
  } else {
    Prototype(layer, head, plane, static_cast<uint32_t>((kind >> 8) % 4), out);
    // Noise of 0.02 per element on a unit vector: cos ~0.995 to the direction.
    for (uint32_t i = 0; i < head_dim_; ++i) out[i] += 0.02f * Gaussian(&state);
  }
  Normalize(out, head_dim_);
  const float magnitude = static_cast<float>(0.5 + 1.5 * UniformUnit(&state));
  for (uint32_t i = 0; i < head_dim_; ++i) {
    // Rounded to the element type, so the float is exactly what the pool holds.
    alignas(4) std::byte encoded[4];
    kernels::F32ToElem(out[i] * magnitude, elem_type_, encoded);
    out[i] = kernels::ElemToF32(encoded, elem_type_);
  }
}

void KvContent::Encoded(uint64_t seed, uint32_t layer, uint64_t position, kernels::KvPlane plane,
                        uint32_t head, std::byte* out) const {
  std::vector<float> v(head_dim_);
  Vector(seed, layer, position, plane, head, v.data());
  for (uint32_t i = 0; i < head_dim_; ++i)
    kernels::F32ToElem(v[i], elem_type_, out + i * elem_bytes_);
}

void KvContent::Decode(const std::byte* src, float* out) const {
  for (uint32_t i = 0; i < head_dim_; ++i)
    out[i] = kernels::ElemToF32(src + i * elem_bytes_, elem_type_);
}

void KvContent::WriteRow(uint64_t seed, uint32_t layer, uint64_t position, std::byte* key_row,
                         std::byte* value_row) const {
  for (uint32_t h = 0; h < num_kv_heads_; ++h) {
    Encoded(seed, layer, position, kernels::KvPlane::kKey, h, key_row + h * head_bytes());
    Encoded(seed, layer, position, kernels::KvPlane::kValue, h, value_row + h * head_bytes());
  }
}

}  // namespace cachemgr::soak
