// The similarity codebook of SpindleKV (paper §3.4, Algorithm 1, eq. 8-14).
//
// Given n vectors, keeps per vector its magnitude (eq. 8) and an index into a codebook of unit
// vectors such that cos(vector, entry) > theta (eq. 9-13). The greedy build picks, each round,
// the vertex of highest degree in the remaining similarity graph G (self-loops included, so a
// vertex with no neighbour left has degree 1; ties go to the lowest index, like numpy.argmax),
// appends its unit vector, assigns it to that vertex and its remaining neighbours, and removes
// them all from G. Rounds end when G is empty, so every vector gets an entry.
//
// Cost: one blocked pass computes the similarities (n^2 * d flops, never materialising an n x n
// float matrix; the adjacency is a bitset, n^2 / 8 bytes); the greedy rounds then cost in
// proportion to the edges they remove (plus a scan of each removed vertex's bitset row).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace cachemgr::compress {

struct Codebook {
  uint32_t dim = 0;
  std::vector<float> entries;     // [size(), dim], unit vectors
  std::vector<uint32_t> refs;     // [n]: entry of each input vector
  std::vector<float> magnitudes;  // [n]: L2 norm of each input vector (eq. 8)
  uint32_t size() const { return dim == 0 ? 0 : static_cast<uint32_t>(entries.size() / dim); }
};

// `vectors` is [n, dim] row-major. theta in (0, 1] (INVALID_ARGUMENT otherwise, naming
// "theta"). A zero vector gets magnitude 0 and is treated as similar to nothing but itself.
absl::StatusOr<Codebook> BuildCodebook(absl::Span<const float> vectors, uint32_t dim, float theta);

// Reconstruction (eq. 14): out[i] = entries[refs[i]] * magnitudes[i]; `out` is [n, dim].
void ReconstructCodebook(const Codebook& codebook, absl::Span<float> out);

// Decode-time append (paper §3.4): for each new vector, the entry with the highest cosine if it
// exceeds theta (the vector then joins it: refs/magnitudes grow). Vectors that match nothing are
// returned by index so the caller can queue them and later code them in a batch with
// AppendBatch.
std::vector<uint32_t> MatchAndAppend(Codebook& codebook, absl::Span<const float> new_vectors,
                                     float theta);
// Runs the greedy build on `vectors` alone and appends the new entries and their refs.
absl::Status AppendBatch(Codebook& codebook, absl::Span<const float> vectors, float theta);

}  // namespace cachemgr::compress
