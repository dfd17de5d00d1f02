// The device stages of the similarity codebook (SpindleKV Algorithm 1, eq. 8-9 and 14): the
// CUDA twins of compress::NormalizeVector, compress::SimilarityAdjacency and
// compress::ReconstructCodebook (cachemgr/compress/codebook.h, codebook_graph.h). The greedy
// rounds (compress::GreedyCoverRounds) stay on the host: they cost in proportion to the edges
// they remove, while the n^2 * d similarity pass is what the GPU takes.
//
// Bit-for-bit parity with the CPU: eq. 8 sums squares in double in element order and divides
// in double (IEEE, no contraction); every cosine is the CPU's eight-lane dot product (lane l
// sums the products of dims k = l mod 8 in increasing k, lanes combined as
// ((0+1)+(2+3))+((4+5)+(6+7))), each product and sum rounded separately. The adjacency bitsets
// are therefore identical, and so are the codebooks built from them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace cachemgr::kernels {

// Eq. 8 per row of x [n, dim]: magnitude[i] = float(sqrt(sum in double of x^2)), unit row
// x / m rounded to float (zeros when m == 0); nonzero[i] = magnitude > 0; finite[i] = 0 when a
// row has a non-finite element (the host reports it). Device pointers.
absl::Status NormalizeRowsCuda(const float* x, uint32_t n, uint32_t dim, float* unit,
                               float* magnitude, uint8_t* nonzero, uint8_t* finite,
                               cudaStream_t stream);

// Eq. 9 as a symmetric bitset: adjacency [n, words = ceil(n / 64)] uint64 words (row i, bit j
// of word j / 64) gets bit (i, j) when i == j, or both vectors are nonzero and cos > theta
// (theta < 1), or cos > 0.999 and the unit vectors are identical (duplicates, which is all
// theta = 1 merges). The whole matrix is written (padding bits zero). Device pointers.
// INVALID_ARGUMENT for dim == 0, theta outside (0, 1] or n beyond 2^20.
absl::Status SimilarityAdjacencyCuda(const float* unit, const uint8_t* nonzero, uint32_t n,
                                     uint32_t dim, float theta, uint64_t* adjacency,
                                     cudaStream_t stream);

// Eq. 14: out[i] = entries[refs[i]] * magnitudes[i] ([n, dim]); a ref >= num_entries leaves its
// row zero. Device pointers.
absl::Status ReconstructCodebookCuda(const float* entries, uint32_t num_entries,
                                     const uint32_t* refs, const float* magnitudes, uint32_t n,
                                     uint32_t dim, float* out, cudaStream_t stream);

}  // namespace cachemgr::kernels
