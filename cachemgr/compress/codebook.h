// The similarity codebook of SpindleKV (paper §3.4, Algorithm 1, eq. 8-14).
//
// Given n vectors, keeps per vector its magnitude (eq. 8) and an index into a codebook of unit
// vectors such that cos(vector, entry) > theta (eq. 9-13). The greedy build picks, each round,
// the vertex of highest degree in the remaining similarity graph G (self-loops included, so a
// vertex with no neighbour left has degree 1; ties go to the lowest index, like numpy.argmax),
// appends its unit vector, assigns it to that vertex and its remaining neighbours, and removes
// them all from G. Rounds end when G is empty, so every vector gets an entry.
//
// Cost: CodebookSearch::kExact computes every similarity in one blocked pass (n^2 * d flops,
// never materialising an n x n float matrix; the adjacency is a bitset, n^2 / 8 bytes);
// kLsh finds the similar pairs by hashing (codebook_lsh.h: about n * d * 32 flops plus the
// candidates), each verified exactly. The greedy rounds then cost in proportion to the edges
// they remove (plus a scan of each removed vertex's bitset row).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace cachemgr::compress {

class SimilarityGraphBuilder;  // codebook_graph.h

struct Codebook {
  uint32_t dim = 0;
  std::vector<float> entries;     // [size(), dim], unit vectors
  std::vector<uint32_t> refs;     // [n]: entry of each input vector
  std::vector<float> magnitudes;  // [n]: L2 norm of each input vector (eq. 8)
  uint32_t size() const { return dim == 0 ? 0 : static_cast<uint32_t>(entries.size() / dim); }
};

// How BuildCodebook finds the edges of the similarity graph.
enum class CodebookSearch : uint8_t {
  // Every pair compared: Algorithm 1's graph exactly (the codebooks of every release so far).
  kExact,
  // Candidate pairs from locality-sensitive hashing (codebook_lsh.h), each verified by the exact
  // edge test: the graph may lack a similar pair hashing missed (never has a false edge), and
  // entries are matched among hashed candidates. Hashing runs on the host; where it gives way
  // to the exact pass (few vectors, or data it cannot separate), the graph builder runs that.
  // Sub-quadratic: docs/PERF.md measures time, pairs found and the NLL cost.
  kLsh,
};

// Largest number of vectors whose similarity graph one Algorithm 1 run builds (its bitset is
// n^2 / 8 bytes: 32 MiB here).
inline constexpr uint32_t kMaxGraphVectors = 16384;

// Memory BuildCodebook reuses from one similarity graph to the next (the bitset is up to
// 32 MiB: faulting its pages in anew for every graph cost more than zeroing them, and a hashed
// graph clears only the bits it set). One per thread building codebooks; it holds the largest
// bitset built until it is destroyed.
struct CodebookScratch {
  std::vector<uint64_t> adjacency;
  size_t dirty_words = 0;  // adjacency[0, dirty_words) may hold set bits; the rest are zero
};

struct CodebookOptions {
  // See BuildCodebook; > 0.
  uint32_t max_graph_vectors = kMaxGraphVectors;
  CodebookSearch search = CodebookSearch::kExact;
  // Builds each exact similarity graph (null: SimilarityAdjacency on this thread); its errors
  // pass through.
  const SimilarityGraphBuilder* graph = nullptr;
  // Reused between graphs (null: each graph allocates its own); not shared between threads.
  CodebookScratch* scratch = nullptr;
};

// `vectors` is [n, dim] row-major. theta in (0, 1] (INVALID_ARGUMENT otherwise, naming
// "theta"). A zero vector gets magnitude 0 and is treated as similar to nothing but itself.
// Up to max_graph_vectors vectors: Algorithm 1. More: consecutive chunks of max_graph_vectors,
// the first by Algorithm 1, each later one as decode-time appends are coded (§3.4): a vector
// joins the most similar entry so far when cos > theta (MatchEntry; under kLsh the most similar
// of the hashed candidates), and Algorithm 1 codes the chunk's unmatched vectors on their own,
// appending their entries.
absl::StatusOr<Codebook> BuildCodebook(absl::Span<const float> vectors, uint32_t dim, float theta,
                                       const CodebookOptions& options = {});

// Reconstruction (eq. 14): out[i] = entries[refs[i]] * magnitudes[i]; `out` is [n, dim].
void ReconstructCodebook(const Codebook& codebook, absl::Span<float> out);

// Eq. 8 for one vector: magnitude (computed in double) and unit vector x / m (all zeros when
// m = 0). False when an element is not finite.
bool NormalizeVector(const float* x, uint32_t dim, float* unit, float* magnitude);

// The entry of `entries` ([count, dim] unit vectors) most similar to the unit vector `unit` if
// it passes the edge test of BuildCodebook (cos > theta, or identical at theta = 1), else -1.
// Ties keep the lowest index. The same float arithmetic as the build's.
int64_t MatchEntry(absl::Span<const float> entries, uint32_t dim, const float* unit, float theta);

}  // namespace cachemgr::compress
