// One instruction-set build of the compression kernels (vector_kernels.h). CMake compiles this
// file once per instruction set, with CACHEMGR_ISA_TABLE naming the table it defines and
// CACHEMGR_ISA_NAME its VectorKernels::name.
//
// Rules that keep the builds apart (vector_kernels.h says why): every function here has internal
// linkage, and the file includes no header beyond <cstddef>, <cstdint>, <cstring> and
// vector_kernels.h (no std:: algorithm or container, whose inline copies the linker would merge
// across builds).
#include "cachemgr/compress/vector_kernels.h"

#include <cstddef>
#include <cstdint>
#include <cstring>

#if !defined(CACHEMGR_ISA_TABLE) || !defined(CACHEMGR_ISA_NAME)
#error "CACHEMGR_ISA_TABLE and CACHEMGR_ISA_NAME must name this build's table"
#endif

namespace cachemgr::compress {
namespace {

// Similarity tiles hold about this many bytes of unit vectors each (two tiles live in L2).
constexpr size_t kTileBytes = 32 * 1024;

// Two unit vectors that are element-wise identical always have a computed cosine above this
// (the float rounding of a d-term dot product of unit vectors is far below 1e-3).
constexpr float kIdenticalCandidate = 0.999f;

constexpr uint32_t kKeyBlock = kLogitsKeyBlock;

size_t MinSize(size_t a, size_t b) { return a < b ? a : b; }
size_t MaxSize(size_t a, size_t b) { return a > b ? a : b; }

// Every cosine is this dot product of float unit vectors with a float accumulator: eight
// partial sums (lane l takes the elements k with k % 8 == l, the last dim % 8 elements going to
// lanes 0, 1, ...), combined pairwise at the end. The order is fixed, so a pair's value never
// depends on the tiling, on which kernel computed it or on the instruction set, and
// dot(a, b) == dot(b, a) bit for bit. The lanes are one 8-float vector (GCC/Clang vector
// extensions): one AVX register in the AVX2 build, two SSE (or NEON) registers otherwise -- the
// same eight sums either way, since the library is compiled with -ffp-contract=off (no FMA
// contraction). Float (not double) error is about 1e-7 * sqrt(d), far below any useful theta
// step.
typedef float Float8 __attribute__((vector_size(32)));

Float8 Load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

Float8 Splat(float x) {
  Float8 v;
  for (int l = 0; l < 8; ++l) v[l] = x;
  return v;
}

float Reduce(Float8 lanes, const float* tail, uint32_t tail_len) {
  float s[8];
  std::memcpy(s, &lanes, sizeof(lanes));
  for (uint32_t l = 0; l < tail_len; ++l) s[l] += tail[l];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

float Dot(const float* a, const float* b, uint32_t dim) {
  Float8 acc = {};
  uint32_t k = 0;
  for (; k + 8 <= dim; k += 8) acc += Load8(a + k) * Load8(b + k);
  float tail[8];
  const uint32_t tail_len = dim - k;
  for (uint32_t l = 0; l < tail_len; ++l) tail[l] = a[k + l] * b[k + l];
  return Reduce(acc, tail, tail_len);
}

// Dot() of `a` with four vectors at once (the loads of `a` shared); same arithmetic per pair.
void Dot4(const float* a, const float* b, uint32_t dim, float out[4]) {
  const float* b0 = b;
  const float* b1 = b + dim;
  const float* b2 = b + 2 * dim;
  const float* b3 = b + 3 * dim;
  Float8 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  uint32_t k = 0;
  for (; k + 8 <= dim; k += 8) {
    const Float8 x = Load8(a + k);
    acc0 += x * Load8(b0 + k);
    acc1 += x * Load8(b1 + k);
    acc2 += x * Load8(b2 + k);
    acc3 += x * Load8(b3 + k);
  }
  const uint32_t tail_len = dim - k;
  float tail[4][8];
  for (uint32_t l = 0; l < tail_len; ++l) {
    tail[0][l] = a[k + l] * b0[k + l];
    tail[1][l] = a[k + l] * b1[k + l];
    tail[2][l] = a[k + l] * b2[k + l];
    tail[3][l] = a[k + l] * b3[k + l];
  }
  out[0] = Reduce(acc0, tail[0], tail_len);
  out[1] = Reduce(acc1, tail[1], tail_len);
  out[2] = Reduce(acc2, tail[2], tail_len);
  out[3] = Reduce(acc3, tail[3], tail_len);
}

bool Identical(const float* a, const float* b, uint32_t dim) {
  for (uint32_t k = 0; k < dim; ++k) {
    if (!(a[k] == b[k])) return false;
  }
  return true;
}

// The edge test of eq. 9, cos > theta. Vectors whose unit vectors are identical are always
// similar, so that theta = 1 (where cos > 1 can only be a rounding artefact, hence ignored)
// merges exactly the duplicates. Zero vectors (unit vector 0, dot 0) are similar to nothing.
bool Similar(float dot, float theta, const float* a, const float* b, uint32_t dim) {
  if (theta < 1.0f && dot > theta) return true;
  return dot > kIdenticalCandidate && Identical(a, b, dim);
}

// Dot() of `a` with the eight vectors of one transposed block ([dim][8]), side by side: r_l is
// lane l of Dot() for all eight pairs (the products of dims k = l, l + 8, ... added in increasing
// k; the last dim % 8 go to lanes 0, 1, ...), combined in Reduce()'s tree. Eight named
// accumulators (not an array) so that they stay in registers.
Float8 BlockDot(const float* a, const float* bt, uint32_t dim) {
  Float8 r0 = {}, r1 = {}, r2 = {}, r3 = {}, r4 = {}, r5 = {}, r6 = {}, r7 = {};
  uint32_t k = 0;
  for (; k + 8 <= dim; k += 8) {
    const float* b = bt + size_t{k} * 8;
    r0 += Splat(a[k]) * Load8(b);
    r1 += Splat(a[k + 1]) * Load8(b + 8);
    r2 += Splat(a[k + 2]) * Load8(b + 16);
    r3 += Splat(a[k + 3]) * Load8(b + 24);
    r4 += Splat(a[k + 4]) * Load8(b + 32);
    r5 += Splat(a[k + 5]) * Load8(b + 40);
    r6 += Splat(a[k + 6]) * Load8(b + 48);
    r7 += Splat(a[k + 7]) * Load8(b + 56);
  }
  const uint32_t tail = dim - k;
  const float* b = bt + size_t{k} * 8;
  if (tail > 0) r0 += Splat(a[k]) * Load8(b);
  if (tail > 1) r1 += Splat(a[k + 1]) * Load8(b + 8);
  if (tail > 2) r2 += Splat(a[k + 2]) * Load8(b + 16);
  if (tail > 3) r3 += Splat(a[k + 3]) * Load8(b + 24);
  if (tail > 4) r4 += Splat(a[k + 4]) * Load8(b + 32);
  if (tail > 5) r5 += Splat(a[k + 5]) * Load8(b + 40);
  if (tail > 6) r6 += Splat(a[k + 6]) * Load8(b + 48);
  return ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7));
}

// Whether any lane of `dot` is above `bound` (false for NaN lanes).
bool AnyAbove(Float8 dot, float bound) {
  typedef int32_t Int8 __attribute__((vector_size(32)));
  const Int8 above = dot > Splat(bound);  // -1 where above
  uint64_t words[4];
  std::memcpy(words, &above, sizeof(words));
  return (words[0] | words[1] | words[2] | words[3]) != 0;
}

// Eight pairs (a, b_0..b_7) at a time from the transposed blocks (BlockDot: bit-identical to
// Dot()'s, with no per-pair horizontal reduction); a block with no candidate is passed over.
void SimilarityPairs(const float* unit, const float* transposed, const uint8_t* nonzero, size_t n,
                     uint32_t dim, float theta, uint64_t* adjacency) {
  const size_t words = (n + 63) / 64;
  // Pairs below this cosine cannot be similar (see Similar()).
  const float candidate = theta < kIdenticalCandidate ? theta : kIdenticalCandidate;
  // Tiles of whole 8-blocks; two tiles of vectors stay in L2.
  size_t tile = kTileBytes / (sizeof(float) * dim);
  tile = tile < 8 ? 8 : (tile > 512 ? 512 : tile);
  tile = tile / 8 * 8;
  for (size_t i0 = 0; i0 < n; i0 += tile) {
    const size_t i1 = MinSize(n, i0 + tile);
    for (size_t j0 = i0 / 8 * 8; j0 < n; j0 += tile) {
      const size_t j1 = MinSize(n, j0 + tile);
      for (size_t i = i0; i < i1; ++i) {
        if (!nonzero[i]) continue;
        const float* a = &unit[i * dim];
        const size_t first = MaxSize(j0, i + 1);
        if (first >= j1) continue;
        for (size_t jb = first / 8; jb * 8 < j1; ++jb) {
          const Float8 dot = BlockDot(a, &transposed[jb * 8 * dim], dim);
          if (!AnyAbove(dot, candidate)) continue;
          for (uint32_t p = 0; p < 8; ++p) {
            const size_t j = jb * 8 + p;
            if (j < first || j >= j1 || !(dot[p] > candidate)) continue;
            if (Similar(dot[p], theta, a, &unit[j * dim], dim)) {
              adjacency[i * words + j / 64] |= uint64_t{1} << (j % 64);
              adjacency[j * words + i / 64] |= uint64_t{1} << (i % 64);
            }
          }
        }
      }
    }
  }
}

int64_t MatchEntry(const float* entries, size_t count, uint32_t dim, const float* unit,
                   float theta) {
  int64_t best = -1;
  float best_dot = 0.0f;
  // Strictly greater: ties keep the lowest entry index.
  auto consider = [&](size_t index, float dot) {
    if (Similar(dot, theta, unit, &entries[index * dim], dim) && (best < 0 || dot > best_dot)) {
      best = static_cast<int64_t>(index);
      best_dot = dot;
    }
  };
  size_t e = 0;
  float dots[4];
  for (; e + 4 <= count; e += 4) {
    Dot4(unit, &entries[e * dim], dim, dots);
    for (size_t q = 0; q < 4; ++q) consider(e + q, dots[q]);
  }
  for (; e < count; ++e) consider(e, Dot(unit, &entries[e * dim], dim));
  return best;
}

size_t SimilarListedPairs(const float* unit, uint32_t dim, float theta, const uint32_t* pairs,
                          size_t count, size_t words, uint64_t* adjacency) {
  size_t edges = 0;
  for (size_t p = 0; p < count; ++p) {
    const size_t i = pairs[2 * p];
    const size_t j = pairs[2 * p + 1];
    const float* a = &unit[i * dim];
    const float* b = &unit[j * dim];
    if (Similar(Dot(a, b, dim), theta, a, b, dim)) {
      adjacency[i * words + j / 64] |= uint64_t{1} << (j % 64);
      adjacency[j * words + i / 64] |= uint64_t{1} << (i % 64);
      ++edges;
    }
  }
  return edges;
}

int64_t MatchListedEntry(const float* entries, const uint32_t* candidates, size_t count,
                         uint32_t dim, const float* unit, float theta) {
  int64_t best = -1;
  float best_dot = 0.0f;
  for (size_t c = 0; c < count; ++c) {
    const float* entry = &entries[size_t{candidates[c]} * dim];
    const float dot = Dot(unit, entry, dim);
    // Candidates ascend, so strictly greater keeps the lowest index on ties, as MatchEntry.
    if (Similar(dot, theta, unit, entry, dim) && (best < 0 || dot > best_dot)) {
      best = candidates[c];
      best_dot = dot;
    }
  }
  return best;
}

// Four 8-wide accumulators hold the 32 projections of one row; each added in k order.
void LshProject(const float* rows, size_t n, uint32_t dim, const float* directions, float* out) {
  static_assert(kLshProjections == 32, "four Float8 accumulators");
  for (size_t r = 0; r < n; ++r) {
    const float* x = &rows[r * dim];
    Float8 acc[4] = {};
    for (uint32_t k = 0; k < dim; ++k) {
      const Float8 xk = Splat(x[k]);
      const float* g = &directions[size_t{k} * kLshProjections];
      for (int q = 0; q < 4; ++q) acc[q] += xk * Load8(g + 8 * q);
    }
    std::memcpy(&out[r * kLshProjections], acc, sizeof(acc));
  }
}

// Four query rows share each load of the key block.
void BlockLogits(const float* query_tile, uint32_t rows, uint32_t head_dim, const float* key_block,
                 float* logits, size_t stride) {
  uint32_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    float acc0[kKeyBlock] = {};
    float acc1[kKeyBlock] = {};
    float acc2[kKeyBlock] = {};
    float acc3[kKeyBlock] = {};
    const float* q0 = query_tile + static_cast<size_t>(r) * head_dim;
    const float* q1 = q0 + head_dim;
    const float* q2 = q1 + head_dim;
    const float* q3 = q2 + head_dim;
    for (uint32_t i = 0; i < head_dim; ++i) {
      const float* k = key_block + static_cast<size_t>(i) * kKeyBlock;
      const float a0 = q0[i];
      const float a1 = q1[i];
      const float a2 = q2[i];
      const float a3 = q3[i];
      for (uint32_t j = 0; j < kKeyBlock; ++j) {
        acc0[j] += a0 * k[j];
        acc1[j] += a1 * k[j];
        acc2[j] += a2 * k[j];
        acc3[j] += a3 * k[j];
      }
    }
    float* out = logits + r * stride;
    for (uint32_t j = 0; j < kKeyBlock; ++j) {
      out[j] = acc0[j];
      out[stride + j] = acc1[j];
      out[2 * stride + j] = acc2[j];
      out[3 * stride + j] = acc3[j];
    }
  }
  for (; r < rows; ++r) {
    float acc[kKeyBlock] = {};
    const float* q = query_tile + static_cast<size_t>(r) * head_dim;
    for (uint32_t i = 0; i < head_dim; ++i) {
      const float* k = key_block + static_cast<size_t>(i) * kKeyBlock;
      for (uint32_t j = 0; j < kKeyBlock; ++j) acc[j] += q[i] * k[j];
    }
    for (uint32_t j = 0; j < kKeyBlock; ++j) logits[r * stride + j] = acc[j];
  }
}

}  // namespace

extern const VectorKernels CACHEMGR_ISA_TABLE;
const VectorKernels CACHEMGR_ISA_TABLE = {
    .name = CACHEMGR_ISA_NAME,
    .similarity_pairs = &SimilarityPairs,
    .match_entry = &MatchEntry,
    .similar_listed_pairs = &SimilarListedPairs,
    .match_listed_entry = &MatchListedEntry,
    .lsh_project = &LshProject,
    .block_logits = &BlockLogits,
};

}  // namespace cachemgr::compress
