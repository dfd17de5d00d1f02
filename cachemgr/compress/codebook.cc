#include "cachemgr/compress/codebook.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <new>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cachemgr/compress/codebook_graph.h"
#include "cachemgr/compress/codebook_lsh.h"
#include "cachemgr/compress/vector_kernels.h"

namespace cachemgr::compress {
namespace {

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "cachemgr::compress codebook: %s\n", message.c_str());
  std::abort();
}

bool ValidTheta(float theta) { return theta > 0.0f && theta <= 1.0f; }  // false for NaN

// Eq. 8: magnitude in double (then rounded once to float), unit vector x / m rounded to float.
// Returns false for a non-finite element.
bool Normalize(const float* x, uint32_t dim, float* unit, float* magnitude) {
  double sum = 0.0;
  for (uint32_t k = 0; k < dim; ++k) sum += static_cast<double>(x[k]) * x[k];
  if (!std::isfinite(sum)) return false;
  const double m = std::sqrt(sum);
  *magnitude = static_cast<float>(m);
  for (uint32_t k = 0; k < dim; ++k) unit[k] = m > 0.0 ? static_cast<float>(x[k] / m) : 0.0f;
  return true;
}

// Algorithm 1's graph as a symmetric adjacency bitset with the diagonal set.
class BitsetGraph {
 public:
  BitsetGraph(size_t n, const uint64_t* adjacency) : words_((n + 63) / 64), adjacency_(adjacency) {}
  uint32_t Degree(uint32_t v) const {
    uint32_t d = 0;
    for (size_t w = 0; w < words_; ++w) {
      // Most words of a sparse graph are 0, and this build's popcount is a library call.
      if (const uint64_t bits = adjacency_[v * words_ + w]; bits != 0) d += std::popcount(bits);
    }
    return d;
  }
  // fn(u) for every u adjacent to v (v itself included) with bit u of `alive` set.
  template <typename Fn>
  void ForEachAlive(uint32_t v, const uint64_t* alive, Fn&& fn) const {
    const uint64_t* row = adjacency_ + v * words_;
    for (size_t w = 0; w < words_; ++w) {
      uint64_t bits = row[w] & alive[w];
      while (bits != 0) {
        fn(static_cast<uint32_t>(w * 64 + std::countr_zero(bits)));
        bits &= bits - 1;
      }
    }
  }

 private:
  size_t words_;
  const uint64_t* adjacency_;
};

// The same graph as edge lists: edges (i << 32 | j, each pair once) become neighbour lists;
// the self-loops are implied.
class ListGraph {
 public:
  ListGraph(size_t n, const std::vector<uint64_t>& edges) : offsets_(n + 1, 0) {
    for (uint64_t e : edges) {
      ++offsets_[(e >> 32) + 1];
      ++offsets_[static_cast<uint32_t>(e) + 1];
    }
    for (size_t v = 0; v < n; ++v) offsets_[v + 1] += offsets_[v];
    neighbours_.resize(offsets_[n]);
    std::vector<size_t> fill(offsets_.begin(), offsets_.end() - 1);
    for (uint64_t e : edges) {
      const auto i = static_cast<uint32_t>(e >> 32);
      const auto j = static_cast<uint32_t>(e);
      neighbours_[fill[i]++] = j;
      neighbours_[fill[j]++] = i;
    }
  }
  uint32_t Degree(uint32_t v) const {
    return static_cast<uint32_t>(1 + offsets_[v + 1] - offsets_[v]);
  }
  template <typename Fn>
  void ForEachAlive(uint32_t v, const uint64_t* alive, Fn&& fn) const {
    auto is_alive = [&](uint32_t u) { return (alive[u / 64] >> (u % 64)) & 1; };
    if (is_alive(v)) fn(v);
    for (size_t k = offsets_[v]; k < offsets_[v + 1]; ++k) {
      if (is_alive(neighbours_[k])) fn(neighbours_[k]);
    }
  }

 private:
  std::vector<size_t> offsets_;
  std::vector<uint32_t> neighbours_;
};

// Greedy rounds of Algorithm 1 over `Graph` (BitsetGraph or ListGraph: the same rounds, since a
// round's members and the degrees they remove do not depend on the order they are visited in).
template <typename Graph>
class GreedyCover {
 public:
  GreedyCover(size_t n, const Graph& graph)
      : n_(n), words_((n + 63) / 64), graph_(graph), alive_(words_, 0), degree_(n, 0) {
    for (size_t i = 0; i < n; ++i) alive_[i / 64] |= uint64_t{1} << (i % 64);
    for (size_t i = 0; i < n; ++i) degree_[i] = graph.Degree(static_cast<uint32_t>(i));
    leaves_ = 1;
    while (leaves_ < n) leaves_ *= 2;
    tree_.assign(2 * leaves_, kNone);
    for (size_t i = 0; i < n; ++i) tree_[leaves_ + i] = static_cast<uint32_t>(i);
    for (size_t node = leaves_ - 1; node >= 1; --node) {
      tree_[node] = Better(tree_[2 * node], tree_[2 * node + 1]);
    }
    touched_flag_.assign(n, 0);
  }

  // Runs the rounds; entry c of the result is the vertex picked in round c, and (*refs)[v] is
  // the round that removed v.
  std::vector<uint32_t> Run(std::vector<uint32_t>* refs) {
    std::vector<uint32_t> picks;
    refs->assign(n_, 0);
    std::vector<uint32_t> members;
    std::vector<uint32_t> touched;
    while (true) {
      const uint32_t pick = tree_[1];
      if (pick == kNone || degree_[pick] == 0) break;  // G is empty
      const uint32_t round = static_cast<uint32_t>(picks.size());
      picks.push_back(pick);
      // eta = argwhere(G[pick] == 1): the pick itself (self-loop) and its alive neighbours.
      members.clear();
      ForEachAliveNeighbour(pick, [&](uint32_t v) { members.push_back(v); });
      for (uint32_t v : members) {
        (*refs)[v] = round;
        alive_[v / 64] &= ~(uint64_t{1} << (v % 64));
        degree_[v] = 0;
      }
      // Eq. 13 removes the members' rows and columns: every surviving neighbour of a member
      // loses one degree per member edge. Each vertex's row is scanned once, when removed.
      touched.clear();
      for (uint32_t v : members) {
        ForEachAliveNeighbour(v, [&](uint32_t u) {
          --degree_[u];
          if (!touched_flag_[u]) {
            touched_flag_[u] = 1;
            touched.push_back(u);
          }
        });
      }
      for (uint32_t v : members) Update(v);
      for (uint32_t u : touched) {
        touched_flag_[u] = 0;
        Update(u);
      }
    }
    return picks;
  }

 private:
  static constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();

  // Max degree wins; equal degrees go to the lower index (numpy.argmax). Removed vertices have
  // degree 0 and lose to every alive one (degree >= 1 by the self-loop).
  uint32_t Better(uint32_t a, uint32_t b) const {
    if (a == kNone) return b;
    if (b == kNone) return a;
    if (degree_[a] != degree_[b]) return degree_[a] > degree_[b] ? a : b;
    return a < b ? a : b;
  }

  void Update(uint32_t v) {
    for (size_t node = (leaves_ + v) / 2; node >= 1; node /= 2) {
      tree_[node] = Better(tree_[2 * node], tree_[2 * node + 1]);
    }
  }

  template <typename Fn>
  void ForEachAliveNeighbour(uint32_t v, Fn&& fn) const {
    graph_.ForEachAlive(v, alive_.data(), fn);
  }

  size_t n_;
  size_t words_;
  const Graph& graph_;
  std::vector<uint64_t> alive_;
  std::vector<uint32_t> degree_;
  size_t leaves_ = 1;
  std::vector<uint32_t> tree_;  // tournament tree: tree_[1] is the vertex Algorithm 1 picks next
  std::vector<uint8_t> touched_flag_;
};

// Algorithm 1 on one similarity graph over all of `vectors` (validated by the caller).
absl::StatusOr<Codebook> BuildGraph(absl::Span<const float> vectors, uint32_t dim, float theta,
                                    const CodebookOptions& options) {
  const size_t n = vectors.size() / dim;
  Codebook codebook;
  codebook.dim = dim;
  if (n == 0) return codebook;

  std::vector<float> unit(n * dim);
  codebook.magnitudes.resize(n);
  std::vector<uint8_t> nonzero(n);
  for (size_t i = 0; i < n; ++i) {
    if (!Normalize(&vectors[i * dim], dim, &unit[i * dim], &codebook.magnitudes[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("codebook input vector ", i, " has a non-finite element"));
    }
    nonzero[i] = codebook.magnitudes[i] > 0.0f;
  }

  // Eq. 9 in one blocked pass over the upper triangle, never materialising S.
  const size_t words = (n + 63) / 64;
  std::vector<uint64_t> own_adjacency;
  size_t own_dirty = 0;
  std::vector<uint64_t>& adjacency =
      options.scratch != nullptr ? options.scratch->adjacency : own_adjacency;
  size_t& dirty = options.scratch != nullptr ? options.scratch->dirty_words : own_dirty;
  const size_t cells = n * words;
  try {
    std::fill_n(adjacency.begin(), std::min(dirty, adjacency.size()), uint64_t{0});
    dirty = 0;
    if (adjacency.size() < cells) {
      adjacency.clear();
      adjacency.resize(cells);  // zero-filled
    }
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate the ", cells * 8,
                                                     "-byte adjacency bitset for ", n, " vectors"));
  }
  dirty = cells;
  std::vector<uint32_t> picks;
  if (options.search == CodebookSearch::kLsh) {
    LshStats stats;
    std::vector<uint64_t> edges;
    if (absl::Status s =
            LshSimilarityAdjacency(unit.data(), nonzero.data(), n, dim, theta, adjacency.data(),
                                   LshParams{}, &stats, options.graph, &edges);
        !s.ok()) {
      return s;
    }
    if (!stats.exact && edges.size() == stats.edges) {
      // A hashed graph holds a small fraction of all pairs: the rounds run on its edge lists
      // rather than scanning n^2 / 8 bytes of bitset, and only its bits are cleared again.
      const ListGraph graph(n, edges);
      picks = GreedyCover<ListGraph>(n, graph).Run(&codebook.refs);
      for (uint64_t e : edges) {
        const size_t i = e >> 32;
        const size_t j = static_cast<uint32_t>(e);
        adjacency[i * words + j / 64] = 0;
        adjacency[j * words + i / 64] = 0;
      }
      for (size_t i = 0; i < n; ++i) adjacency[i * words + i / 64] = 0;
      dirty = 0;
    }
  } else if (options.graph == nullptr) {
    SimilarityAdjacency(unit.data(), nonzero.data(), n, dim, theta, adjacency.data());
  } else if (absl::Status s =
                 options.graph->Build(unit.data(), nonzero.data(), n, dim, theta, adjacency.data());
             !s.ok()) {
    return s;
  }
  if (dirty != 0) picks = GreedyCoverRounds(n, adjacency.data(), &codebook.refs);
  codebook.entries.resize(picks.size() * dim);
  for (size_t c = 0; c < picks.size(); ++c) {
    std::copy_n(&unit[size_t{picks[c]} * dim], dim, &codebook.entries[c * dim]);
  }
  return codebook;
}

absl::Status ValidateBuild(absl::Span<const float> vectors, uint32_t dim, float theta) {
  if (!ValidTheta(theta)) {
    return absl::InvalidArgumentError(absl::StrCat("theta must be in (0, 1], got ", theta));
  }
  if (dim == 0) return absl::InvalidArgumentError("codebook dim must be > 0");
  if (vectors.size() % dim != 0) {
    return absl::InvalidArgumentError(absl::StrCat("codebook input has ", vectors.size(),
                                                   " floats, not a multiple of dim ", dim));
  }
  return absl::OkStatus();
}

}  // namespace

// Eq. 9: self-loops here, the pairs by the selected kernel build, on the vectors also laid out
// in blocks of eight, transposed ([n / 8][dim][8], zero-padded), so that the kernel computes
// eight pairs at once without a horizontal reduction per pair.
void SimilarityAdjacency(const float* unit, const uint8_t* nonzero, size_t n, uint32_t dim,
                         float theta, uint64_t* adjacency) {
  const size_t words = (n + 63) / 64;
  for (size_t i = 0; i < n; ++i) adjacency[i * words + i / 64] |= uint64_t{1} << (i % 64);
  const size_t blocks = (n + 7) / 8;
  std::vector<float> transposed(blocks * 8 * dim, 0.0f);  // [block][k][8]
  for (size_t i = 0; i < n; ++i) {
    for (uint32_t k = 0; k < dim; ++k) {
      transposed[(i / 8) * 8 * dim + size_t{k} * 8 + i % 8] = unit[i * dim + k];
    }
  }
  SelectedVectorKernels().similarity_pairs(unit, transposed.data(), nonzero, n, dim, theta,
                                           adjacency);
}

std::vector<uint32_t> GreedyCoverRounds(size_t n, const uint64_t* adjacency,
                                        std::vector<uint32_t>* refs) {
  const BitsetGraph graph(n, adjacency);
  GreedyCover<BitsetGraph> cover(n, graph);
  return cover.Run(refs);
}

bool NormalizeVector(const float* x, uint32_t dim, float* unit, float* magnitude) {
  return Normalize(x, dim, unit, magnitude);
}

int64_t MatchEntry(absl::Span<const float> entries, uint32_t dim, const float* unit, float theta) {
  const size_t count = dim == 0 ? 0 : entries.size() / dim;
  return SelectedVectorKernels().match_entry(entries.data(), count, dim, unit, theta);
}

absl::StatusOr<Codebook> BuildCodebook(absl::Span<const float> vectors, uint32_t dim, float theta,
                                       const CodebookOptions& options) {
  if (absl::Status s = ValidateBuild(vectors, dim, theta); !s.ok()) return s;
  const uint32_t max_graph_vectors = options.max_graph_vectors;
  if (max_graph_vectors == 0) {
    return absl::InvalidArgumentError("codebook max_graph_vectors must be > 0");
  }
  const size_t n = vectors.size() / dim;
  if (n <= max_graph_vectors) return BuildGraph(vectors, dim, theta, options);

  // Chunks: match against the entries so far, then Algorithm 1 on what matched nothing.
  Codebook codebook;
  codebook.dim = dim;
  codebook.refs.resize(n);
  codebook.magnitudes.resize(n);
  std::vector<float> unit;
  std::vector<uint8_t> nonzero;
  std::vector<int64_t> matches;
  std::vector<float> unmatched;
  std::vector<size_t> unmatched_index;
  for (size_t begin = 0; begin < n; begin += max_graph_vectors) {
    const size_t end = std::min(n, begin + max_graph_vectors);
    const size_t count = end - begin;
    const size_t known = codebook.size();
    unit.resize(count * dim);
    nonzero.resize(count);
    for (size_t i = begin; i < end; ++i) {
      if (!Normalize(&vectors[i * dim], dim, &unit[(i - begin) * dim], &codebook.magnitudes[i])) {
        return absl::InvalidArgumentError(
            absl::StrCat("codebook input vector ", i, " has a non-finite element"));
      }
      nonzero[i - begin] = codebook.magnitudes[i] > 0.0f;
    }
    matches.assign(count, -1);
    if (options.search == CodebookSearch::kLsh) {
      LshMatchEntries(codebook.entries.data(), known, unit.data(), nonzero.data(), count, dim,
                      theta, matches.data());
    } else if (known > 0) {
      for (size_t q = 0; q < count; ++q) {
        if (nonzero[q]) {
          matches[q] = MatchEntry(absl::MakeConstSpan(codebook.entries.data(), known * dim), dim,
                                  &unit[q * dim], theta);
        }
      }
    }
    unmatched.clear();
    unmatched_index.clear();
    for (size_t i = begin; i < end; ++i) {
      if (matches[i - begin] >= 0) {
        codebook.refs[i] = static_cast<uint32_t>(matches[i - begin]);
      } else {
        const float* x = vectors.data() + i * dim;
        unmatched.insert(unmatched.end(), x, x + dim);
        unmatched_index.push_back(i);
      }
    }
    absl::StatusOr<Codebook> part = BuildGraph(unmatched, dim, theta, options);
    if (!part.ok()) return part.status();
    const uint32_t base = codebook.size();
    codebook.entries.insert(codebook.entries.end(), part->entries.begin(), part->entries.end());
    for (size_t j = 0; j < unmatched_index.size(); ++j) {
      codebook.refs[unmatched_index[j]] = base + part->refs[j];
      codebook.magnitudes[unmatched_index[j]] = part->magnitudes[j];
    }
  }
  return codebook;
}

void ReconstructCodebook(const Codebook& codebook, absl::Span<float> out) {
  const size_t dim = codebook.dim;
  const size_t n = codebook.refs.size();
  if (codebook.magnitudes.size() != n || out.size() != n * dim) {
    Die(absl::StrCat("ReconstructCodebook: ", n, " refs, ", codebook.magnitudes.size(),
                     " magnitudes, output of ", out.size(), " floats (want refs * dim = ", n * dim,
                     ")"));
  }
  const size_t entries = codebook.size();
  for (size_t i = 0; i < n; ++i) {
    const size_t ref = codebook.refs[i];
    if (ref >= entries) {
      Die(absl::StrCat("ReconstructCodebook: ref ", ref, " of vector ", i, " >= ", entries,
                       " entries"));
    }
    const float* entry = &codebook.entries[ref * dim];
    const float m = codebook.magnitudes[i];
    for (size_t k = 0; k < dim; ++k) out[i * dim + k] = entry[k] * m;
  }
}

}  // namespace cachemgr::compress
