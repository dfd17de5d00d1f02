// The two stages of Algorithm 1 that BuildCodebook (codebook.h) runs on one similarity graph,
// exposed so the CUDA path can build the graph on the device (kernels/cuda/codebook_graph.h,
// bit-identical to SimilarityAdjacency) and run the same greedy rounds on the host, and so the
// parity tests can compare the stages one by one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace cachemgr::compress {

// Where BuildCodebook's similarity pass runs: the seam through which a backend takes the
// n^2 * d work (the CUDA backend runs kernels/cuda/codebook_graph.h, bit-identical to
// SimilarityAdjacency, so the codebooks do not change). Build() has SimilarityAdjacency's
// contract: `adjacency` [n, ceil(n / 64)] words, zero-filled by the caller, all host memory.
// Implementations are thread-safe: CompressSequence builds layers on several threads.
class SimilarityGraphBuilder {
 public:
  virtual ~SimilarityGraphBuilder() = default;
  virtual absl::Status Build(const float* unit, const uint8_t* nonzero, size_t n, uint32_t dim,
                             float theta, uint64_t* adjacency) const = 0;
};

// Eq. 9 for unit vectors [n, dim] (eq. 8's output; nonzero[i] = magnitude > 0): sets the
// symmetric adjacency bitset [n, words = ceil(n / 64)] (row i, bit j of word j / 64; the caller
// zero-fills it) with self-loops, and an edge (i, j) when both are nonzero and cos > theta
// (theta < 1) or their unit vectors are identical. One blocked pass, n^2 * d / 2 flops.
void SimilarityAdjacency(const float* unit, const uint8_t* nonzero, size_t n, uint32_t dim,
                         float theta, uint64_t* adjacency);

// Eq. 10-13 over that bitset: each round picks the alive vertex of highest degree (ties to the
// lower index), assigns it and its alive neighbours to a new entry and removes them. Returns the
// picked vertices in round order (entry c is the unit vector of pick c); (*refs)[v] is the round
// that removed v. Cost proportional to the edges removed.
std::vector<uint32_t> GreedyCoverRounds(size_t n, const uint64_t* adjacency,
                                        std::vector<uint32_t>* refs);

}  // namespace cachemgr::compress
