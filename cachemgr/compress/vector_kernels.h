// The compression library's hot loops, built once per instruction set and picked at run time
// (internal to cachemgr_compress; codebook.cc and scoring.cc call them).
//
// vector_kernels.cc is compiled twice (cmake/isa_kernels.cmake): for the baseline target, and,
// when the compiler targets x86-64, into a separate object with -mavx2 -mfma. Only these tables
// cross between the two builds, through plain pointers: no vector-typed argument or return
// value ever does (an AVX caller and an SSE callee disagree on how a 32-byte vector is passed:
// the stack corruption that per-function target_clones caused at -O0 and under ASan).
// Everything else in vector_kernels.cc has internal linkage and it includes no header with
// inline functions or templates, so the linker cannot pick the AVX copy of a shared inline
// function for baseline code; the CTest isa_objects__* checks the AVX2 object's symbols.
//
// Every kernel computes the same float operations in the same order in both builds (the
// library is compiled with -ffp-contract=off: no a * b + c fused into an FMA), so the results
// are bit-identical across builds (vector_kernels_test) and to the CUDA twins'.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cachemgr::compress {

struct VectorKernels {
  // Instruction set, for logs and tests: "baseline" or "avx2_fma".
  const char* name;

  // Eq. 9's off-diagonal pass (SimilarityAdjacency, codebook_graph.h): for every pair i < j of
  // the n unit vectors with nonzero[i] and cos > theta (or identical unit vectors), sets bits
  // (i, j) and (j, i) of `adjacency` [n, ceil(n / 64)] words. `unit` [n, dim] row-major;
  // `transposed` the same vectors in blocks of eight, [ceil(n / 8)][dim][8], zero-padded.
  // Self-loops are the caller's.
  void (*similarity_pairs)(const float* unit, const float* transposed, const uint8_t* nonzero,
                           size_t n, uint32_t dim, float theta, uint64_t* adjacency);

  // MatchEntry (codebook.h) over `entries` [count, dim].
  int64_t (*match_entry)(const float* entries, size_t count, uint32_t dim, const float* unit,
                         float theta);

  // similarity_pairs' edge test on listed pairs only (the LSH candidates, codebook_lsh.h): for
  // each pair p, (i, j) = (pairs[2p], pairs[2p + 1]), sets bits (i, j) and (j, i) of
  // `adjacency` [n, words] when unit vectors i and j are similar. The same arithmetic as
  // similarity_pairs, so the same decision for every pair. Returns the number of edges set.
  size_t (*similar_listed_pairs)(const float* unit, uint32_t dim, float theta,
                                 const uint32_t* pairs, size_t count, size_t words,
                                 uint64_t* adjacency);

  // match_entry over the listed entries only: the most similar of entries[candidates[c]]
  // (`candidates` ascending, `count` of them) passing the edge test, else -1; ties keep the
  // lowest index. The same result as match_entry when the candidates hold its answer.
  int64_t (*match_listed_entry)(const float* entries, const uint32_t* candidates, size_t count,
                                uint32_t dim, const float* unit, float theta);

  // The LSH projections of codebook_lsh.h: out[r * kLshProjections + p] = the sum over k
  // (ascending) of rows[r * dim + k] * directions[k * kLshProjections + p], for r < n.
  void (*lsh_project)(const float* rows, size_t n, uint32_t dim, const float* directions,
                      float* out);

  // logits[r * stride + j] = query_tile[r] . key j of key_block, for r < rows, j < 8.
  // query_tile [rows, head_dim]; key_block [head_dim][8] (eight keys, transposed).
  void (*block_logits)(const float* query_tile, uint32_t rows, uint32_t head_dim,
                       const float* key_block, float* logits, size_t stride);
};

// Projections per vector of lsh_project.
inline constexpr uint32_t kLshProjections = 32;

// Keys of key_block above.
inline constexpr uint32_t kLogitsKeyBlock = 8;

// The baseline build (every target).
const VectorKernels& BaselineVectorKernels();

// The AVX2 + FMA build, or null when this binary has none (not x86-64) or this CPU cannot run
// it.
const VectorKernels* Avx2FmaVectorKernels();

// The fastest build this CPU runs, chosen once per process. Thread-safe.
const VectorKernels& SelectedVectorKernels();

}  // namespace cachemgr::compress
