// The codebook's similarity graph without comparing all pairs (CodebookSearch::kLsh, codebook.h).
//
// Only pairs above theta (0.95-0.98 in practice) are edges, so the graph is sparse. For unit
// vectors cos(a, b) > theta exactly when |a - b| < r = sqrt(2 (1 - theta)), so candidates come
// from Euclidean (p-stable) locality-sensitive hashing of the unit vectors (Datar, Immorlica,
// Indyk, Mirrokni 2004): 32 Gaussian directions g_p are shared by every table; table t
// quantises `hashes_per_table` of them, h = floor(g_p . x / w + offset_t,p), with w =
// width_factor * r and its own random offsets in [0, 1), and keys each vector by that tuple
// (hashed to 32 bits: sum of h_i * a_i mod 2^32, random odd a_i). Two vectors are candidates
// when they share a key in any table, and every candidate is verified by
// the exact edge test of SimilarityAdjacency (VectorKernels::similar_listed_pairs, or
// similarity_pairs on a gathered bucket: the same float arithmetic). The graph therefore only
// ever lacks edges (a similar pair no table put together), never has a false one; with every
// similar pair found it is SimilarityAdjacency's bit for bit.
//
// The random draws are seeded and the projections come from VectorKernels::lsh_project
// (bit-identical in every instruction-set build), so a given input always gives the same graph.
// Hashing costs n * 32 * dim; verification is proportional to the distinct candidate pairs: a
// bucket of 16 or more vectors goes whole to the blocked kernel, and the pairs of the smaller
// ones are collected from every table, sorted and deduplicated, so each is tested once, in row
// order. Below `exact_below` vectors,
// and when the candidates outnumber half of all pairs (data so concentrated that hashing cannot
// separate it), the exact pass runs instead: never much slower than exact.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "cachemgr/compress/codebook_graph.h"

namespace cachemgr::compress {

// Every table draws its hashes from the same kLshProjections (vector_kernels.h: 32) Gaussian
// directions.
struct LshParams {
  uint32_t tables = 24;           // a pair is a candidate if any table keys it together
  uint32_t hashes_per_table = 8;  // quantised projections per key (<= kLshProjections)
  float width_factor = 4.0f;      // bucket width w over the radius r = sqrt(2 (1 - theta)); >= 1e-3
  uint64_t seed = 0x5b1d1e4b5a11ceULL;
  // Fewer nonzero vectors than this: the exact pass, which is as cheap there (and misses
  // nothing).
  uint32_t exact_below = 2048;
};

struct LshStats {
  uint64_t candidate_pairs = 0;  // (table, pair) candidates, with repeats across tables
  uint64_t verified_pairs = 0;   // edge tests run (a listed pair once, whatever its tables)
  uint64_t edges = 0;            // pairs i < j found similar
  bool exact = false;            // SimilarityAdjacency ran instead (few vectors, or too
                                 // many candidates)
};

// SimilarityAdjacency's contract (codebook_graph.h: `adjacency` [n, ceil(n / 64)] words,
// zero-filled by the caller; self-loops set here), with the pairs found by hashing. Where the
// exact pass runs instead, `exact` builds it (null: SimilarityAdjacency on this thread); its
// errors pass through. Where hashing ran (stats->exact false), `edges` (when not null) gets
// every edge once, as i << 32 | j with i < j, in no particular order: the bits set besides the
// self-loops, for callers that would rather not scan the bitset; it is left empty instead when
// the edges outnumber n * ceil(n / 64) / 2 (the list would outgrow half the bitset).
absl::Status LshSimilarityAdjacency(const float* unit, const uint8_t* nonzero, size_t n,
                                    uint32_t dim, float theta, uint64_t* adjacency,
                                    const LshParams& params = {}, LshStats* stats = nullptr,
                                    const SimilarityGraphBuilder* exact = nullptr,
                                    std::vector<uint64_t>* edges = nullptr);

// The hash functions for one (dim, theta, params): the shared projections and each table's key.
class LshFamily {
 public:
  LshFamily(uint32_t dim, float theta, const LshParams& params);

  const LshParams& params() const { return params_; }
  // out[p * n + r] = g_p . rows[r], for r < n and p < kLshProjections (projection-major, so
  // that Keys reads each one contiguously).
  void Project(const float* rows, size_t n, float* out) const;
  // Table `table`'s keys of `n` vectors whose projections (Project's layout, for the same n)
  // are `projections`: keys[r] for row r. Equal tuples of buckets give equal keys.
  void Keys(uint32_t table, const float* projections, size_t n, uint32_t* keys) const;

 private:
  uint32_t dim_;
  LshParams params_;
  float inverse_width_;
  std::vector<float> directions_;  // [dim][kLshProjections]
  std::vector<float> offsets_;     // [tables][hashes_per_table], in [0, 1) bucket widths
  std::vector<uint32_t> chosen_;   // [tables][hashes_per_table]: projection of each hash
  std::vector<uint32_t> multipliers_;  // [tables][hashes_per_table]: odd, for the key
};

// MatchEntry (codebook.h) for each of `queries` [count, dim] unit vectors against `entries`
// [known, dim], looking only at the entries that share a key with the query in some table:
// matches[q] = the most similar candidate passing the edge test (ties to the lowest index), or
// -1 (always for a query with nonzero[q] == 0). Fewer entries than params.exact_below, or as
// many candidates as all pairs: MatchEntry over every entry.
void LshMatchEntries(const float* entries, size_t known, const float* queries,
                     const uint8_t* nonzero, size_t count, uint32_t dim, float theta,
                     int64_t* matches, const LshParams& params = {});

}  // namespace cachemgr::compress
