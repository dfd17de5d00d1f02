// The hashed similarity search (codebook_lsh.h) against the exact pass: it only ever loses
// edges, finds what tight clusters hold, falls back to the exact pass where hashing cannot
// separate the data, and BuildCodebook under CodebookSearch::kLsh gives the exact codebook when
// no similar pair is missed.
#include "cachemgr/compress/codebook_lsh.h"

#include <algorithm>
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cachemgr/compress/codebook.h"
#include "cachemgr/compress/codebook_graph.h"

namespace cachemgr::compress {
namespace {

struct UnitSet {
  size_t n = 0;
  uint32_t dim = 0;
  std::vector<float> raw;  // as given to BuildCodebook
  std::vector<float> unit;
  std::vector<uint8_t> nonzero;
};

// `n` vectors of `dim`: vector i is centre (i % centres) plus Gaussian noise of `noise` per
// component, at a random length; every `zero_every`-th one (0: none) is the zero vector.
UnitSet Mixture(size_t n, uint32_t dim, uint32_t centres, float noise, uint32_t seed,
                size_t zero_every = 0) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> length(0.5f, 3.0f);
  std::vector<float> c(size_t{centres} * dim);
  for (float& x : c) x = normal(rng);
  UnitSet s;
  s.n = n;
  s.dim = dim;
  s.raw.assign(n * dim, 0.0f);
  s.unit.assign(n * dim, 0.0f);
  s.nonzero.assign(n, 0);
  for (size_t i = 0; i < n; ++i) {
    if (zero_every != 0 && i % zero_every == zero_every - 1) continue;
    const float scale = length(rng);
    for (uint32_t k = 0; k < dim; ++k) {
      s.raw[i * dim + k] = scale * (c[(i % centres) * dim + k] + noise * normal(rng));
    }
    float magnitude = 0.0f;
    REQUIRE(NormalizeVector(&s.raw[i * dim], dim, &s.unit[i * dim], &magnitude));
    s.nonzero[i] = magnitude > 0.0f;
  }
  return s;
}

std::vector<uint64_t> ExactGraph(const UnitSet& s, float theta) {
  std::vector<uint64_t> adjacency(s.n * ((s.n + 63) / 64), 0);
  SimilarityAdjacency(s.unit.data(), s.nonzero.data(), s.n, s.dim, theta, adjacency.data());
  return adjacency;
}

std::vector<uint64_t> HashedGraph(const UnitSet& s, float theta, const LshParams& params,
                                  LshStats* stats) {
  std::vector<uint64_t> adjacency(s.n * ((s.n + 63) / 64), 0);
  REQUIRE(LshSimilarityAdjacency(s.unit.data(), s.nonzero.data(), s.n, s.dim, theta,
                                 adjacency.data(), params, stats)
              .ok());
  return adjacency;
}

uint64_t Edges(const std::vector<uint64_t>& adjacency, size_t n) {
  uint64_t bits = 0;
  for (uint64_t w : adjacency) bits += std::popcount(w);
  return (bits - n) / 2;
}

LshParams Forced() {
  LshParams params;
  params.exact_below = 0;  // hash even small inputs
  return params;
}

TEST_CASE("hashed graph: a subset of the exact one, symmetric, most pairs found", "[cpu]") {
  // Many loose clusters: plenty of pairs near theta, many far apart.
  const UnitSet s = Mixture(3000, 64, 200, 0.18f, 7, /*zero_every=*/97);
  for (float theta : {0.95f, 0.98f}) {
    const std::vector<uint64_t> exact = ExactGraph(s, theta);
    LshStats stats;
    const std::vector<uint64_t> hashed = HashedGraph(s, theta, Forced(), &stats);
    const size_t words = (s.n + 63) / 64;
    for (size_t w = 0; w < hashed.size(); ++w)
      CHECK((hashed[w] & ~exact[w]) == 0);  // no false edge
    for (size_t i = 0; i < s.n; ++i) {
      CHECK(((hashed[i * words + i / 64] >> (i % 64)) & 1) == 1);  // self-loops
      for (size_t j = i + 1; j < s.n; j += 37) {
        CHECK(((hashed[i * words + j / 64] >> (j % 64)) & 1) ==
              ((hashed[j * words + i / 64] >> (i % 64)) & 1));
      }
    }
    const uint64_t exact_edges = Edges(exact, s.n);
    REQUIRE(exact_edges > 500);
    CHECK_FALSE(stats.exact);
    CHECK(stats.edges == Edges(hashed, s.n));
    CHECK(static_cast<double>(stats.edges) >= 0.98 * static_cast<double>(exact_edges));
    // Sub-quadratic: far fewer pair tests than all pairs.
    CHECK(stats.verified_pairs < s.n * (s.n - 1) / 2 / 4);
  }
}

TEST_CASE("hashed graph: tight clusters and duplicates are found whole, deterministically",
          "[cpu]") {
  UnitSet s = Mixture(2500, 32, 400, 0.01f, 11, /*zero_every=*/50);
  for (size_t i = 5; i < s.n; i += 10) {  // exact duplicates of the previous vector
    std::copy_n(&s.unit[(i - 1) * s.dim], s.dim, &s.unit[i * s.dim]);
    s.nonzero[i] = s.nonzero[i - 1];
  }
  for (float theta : {0.98f, 1.0f}) {
    LshStats stats;
    const std::vector<uint64_t> hashed = HashedGraph(s, theta, Forced(), &stats);
    CHECK_FALSE(stats.exact);
    CHECK(hashed == ExactGraph(s, theta));
    CHECK(hashed == HashedGraph(s, theta, Forced(), nullptr));  // same seed, same graph
  }
}

TEST_CASE("hashed graph: pairs tested in large buckets and in small ones are counted once",
          "[cpu]") {
  // Clusters of 24 around 16 (the blocked-bucket size): some tables key a cluster whole (the
  // blocked kernel), others split it into small buckets (listed pairs), so the two ways meet on
  // the same pairs.
  const UnitSet s = Mixture(2400, 32, 100, 0.02f, 13);
  LshStats stats;
  const std::vector<uint64_t> hashed = HashedGraph(s, 0.98f, Forced(), &stats);
  CHECK_FALSE(stats.exact);
  CHECK(hashed == ExactGraph(s, 0.98f));
  CHECK(stats.edges == Edges(hashed, s.n));
  // Candidates repeat across tables; each listed pair is tested once.
  CHECK(stats.verified_pairs < stats.candidate_pairs);
}

TEST_CASE("hashed graph: the exact pass where hashing cannot separate the data", "[cpu]") {
  // One tight cone: every pair collides in every table.
  const UnitSet cone = Mixture(2200, 16, 1, 0.02f, 3);
  LshStats stats;
  CHECK(HashedGraph(cone, 0.9f, Forced(), &stats) == ExactGraph(cone, 0.9f));
  CHECK(stats.exact);
  // Fewer vectors than exact_below: the exact pass too.
  const UnitSet few = Mixture(300, 16, 30, 0.2f, 4);
  LshStats few_stats;
  CHECK(HashedGraph(few, 0.95f, LshParams{}, &few_stats) == ExactGraph(few, 0.95f));
  CHECK(few_stats.exact);
}

// Fails every build, counting the calls.
class FailingGraph final : public SimilarityGraphBuilder {
 public:
  absl::Status Build(const float*, const uint8_t*, size_t, uint32_t, float,
                     uint64_t*) const override {
    ++calls;
    return absl::ResourceExhaustedError("device out of memory");
  }
  mutable int calls = 0;
};

TEST_CASE("hashed graph: the exact pass is the graph builder's, its errors pass through", "[cpu]") {
  FailingGraph device;
  const UnitSet cone = Mixture(2200, 16, 1, 0.02f, 3);
  std::vector<uint64_t> adjacency(cone.n * ((cone.n + 63) / 64), 0);
  absl::Status s = LshSimilarityAdjacency(cone.unit.data(), cone.nonzero.data(), cone.n, cone.dim,
                                          0.9f, adjacency.data(), Forced(), nullptr, &device);
  CHECK(s.code() == absl::StatusCode::kResourceExhausted);
  CHECK(s.message() == "device out of memory");
  CHECK(device.calls == 1);
  // Where hashing runs, the builder is not asked.
  const UnitSet spread = Mixture(3000, 64, 200, 0.18f, 7);
  std::vector<uint64_t> hashed(spread.n * ((spread.n + 63) / 64), 0);
  CHECK(LshSimilarityAdjacency(spread.unit.data(), spread.nonzero.data(), spread.n, spread.dim,
                               0.95f, hashed.data(), Forced(), nullptr, &device)
            .ok());
  CHECK(device.calls == 1);
  // Through BuildCodebook: a small input is the builder's exact pass.
  CodebookOptions options;
  options.search = CodebookSearch::kLsh;
  options.graph = &device;
  CHECK(BuildCodebook(spread.raw, spread.dim, 0.95f, options).status().code() ==
        absl::StatusCode::kOk);  // 3000 vectors: hashed
  CHECK(BuildCodebook(absl::MakeConstSpan(spread.raw.data(), 100 * spread.dim), spread.dim, 0.95f,
                      options)
            .status()
            .code() == absl::StatusCode::kResourceExhausted);
  CHECK(device.calls == 2);
}

TEST_CASE("LshMatchEntries: a hashed candidate passing the edge test, or MatchEntry", "[cpu]") {
  const UnitSet entries = Mixture(2600, 64, 2600, 0.0f, 21);  // 2600 distinct directions
  // The same centres (same seed) plus noise: each query is similar to its centre only.
  const UnitSet noisy = Mixture(1500, 64, 2600, 0.03f, 21, /*zero_every=*/31);
  const float theta = 0.95f;
  std::vector<int64_t> matches(noisy.n);
  LshMatchEntries(entries.unit.data(), entries.n, noisy.unit.data(), noisy.nonzero.data(), noisy.n,
                  noisy.dim, theta, matches.data());
  size_t live = 0, found = 0, agree = 0;
  for (size_t q = 0; q < noisy.n; ++q) {
    const int64_t want = MatchEntry(entries.unit, entries.dim, &noisy.unit[q * noisy.dim], theta);
    if (!noisy.nonzero[q]) {
      CHECK(matches[q] == -1);
      continue;
    }
    ++live;
    if (matches[q] >= 0) {
      ++found;
      // The match passes the edge test, and it is MatchEntry's unless hashing missed that one.
      const int64_t alone =
          MatchEntry(absl::MakeConstSpan(&entries.unit[matches[q] * entries.dim], entries.dim),
                     entries.dim, &noisy.unit[q * noisy.dim], theta);
      CHECK(alone == 0);
    }
    agree += matches[q] == want ? 1 : 0;
  }
  REQUIRE(live > 1400);
  CHECK(found >= 0.98 * live);
  CHECK(agree >= 0.98 * live);

  // Fewer entries than exact_below: exactly MatchEntry.
  const size_t few = 100;
  std::vector<int64_t> small(noisy.n);
  LshMatchEntries(entries.unit.data(), few, noisy.unit.data(), noisy.nonzero.data(), noisy.n,
                  noisy.dim, theta, small.data());
  for (size_t q = 0; q < noisy.n; ++q) {
    const int64_t want =
        noisy.nonzero[q] ? MatchEntry(absl::MakeConstSpan(entries.unit.data(), few * entries.dim),
                                      entries.dim, &noisy.unit[q * noisy.dim], theta)
                         : -1;
    CHECK(small[q] == want);
  }
}

TEST_CASE("BuildCodebook kLsh: a reused scratch gives the codebooks fresh memory gives", "[cpu]") {
  CodebookScratch scratch;
  CodebookOptions fresh;
  fresh.search = CodebookSearch::kLsh;
  CodebookOptions reused = fresh;
  reused.scratch = &scratch;
  // Hashed graphs of different sizes, one that falls back to the exact pass (every vector in
  // one tight cluster: hashing cannot separate it) and leaves its bits behind, then smaller
  // hashed ones over that memory, and chunks.
  struct Case {
    size_t n;
    uint32_t centres;
    float noise;
    uint32_t max_graph_vectors;
    int clean;  // after the build: 1 (the last graph was hashed), 0 (exact), -1 (either)
  };
  for (const Case& c :
       {Case{3000, 200, 0.18f, kMaxGraphVectors, 1}, Case{2600, 1, 0.001f, 8192, 0},
        Case{2300, 300, 0.05f, kMaxGraphVectors, 1}, Case{5000, 400, 0.1f, 2100, -1}}) {
    CAPTURE(c.n, c.centres);
    const UnitSet s = Mixture(c.n, 64, c.centres, c.noise, 17, /*zero_every=*/89);
    fresh.max_graph_vectors = reused.max_graph_vectors = c.max_graph_vectors;
    const absl::StatusOr<Codebook> a = BuildCodebook(s.raw, s.dim, 0.95f, fresh);
    const absl::StatusOr<Codebook> b = BuildCodebook(s.raw, s.dim, 0.95f, reused);
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    CHECK(a->entries == b->entries);
    CHECK(a->refs == b->refs);
    CHECK(a->magnitudes == b->magnitudes);
    // A hashed graph clears what it set; the exact pass leaves its words to the next build.
    const bool clean = std::all_of(scratch.adjacency.begin(), scratch.adjacency.end(),
                                   [](uint64_t w) { return w == 0; });
    CHECK(clean == (scratch.dirty_words == 0));
    if (c.clean >= 0) CHECK(clean == (c.clean == 1));
  }
  CHECK(!scratch.adjacency.empty());
}

TEST_CASE("hashed graph: the edge list, and its bound", "[cpu]") {
  // Loose clusters: a few edges per vector, all listed.
  const UnitSet sparse = Mixture(3000, 64, 200, 0.18f, 7);
  LshStats stats;
  std::vector<uint64_t> edges;
  std::vector<uint64_t> adjacency(sparse.n * ((sparse.n + 63) / 64), 0);
  REQUIRE(LshSimilarityAdjacency(sparse.unit.data(), sparse.nonzero.data(), sparse.n, sparse.dim,
                                 0.95f, adjacency.data(), LshParams{}, &stats, nullptr, &edges)
              .ok());
  REQUIRE_FALSE(stats.exact);
  REQUIRE(stats.edges > 0);
  CHECK(edges.size() == stats.edges);
  std::vector<uint64_t> from_list(adjacency.size(), 0);
  const size_t words = (sparse.n + 63) / 64;
  for (size_t i = 0; i < sparse.n; ++i) from_list[i * words + i / 64] |= uint64_t{1} << (i % 64);
  for (uint64_t e : edges) {
    const size_t i = e >> 32;
    const size_t j = static_cast<uint32_t>(e);
    REQUIRE(i < j);
    from_list[i * words + j / 64] |= uint64_t{1} << (j % 64);
    from_list[j * words + i / 64] |= uint64_t{1} << (i % 64);
  }
  CHECK(from_list == adjacency);

  // Clusters of ~44 identical directions: hashing still pays (each pair is a candidate in every
  // table, 24 x 52k < half of all pairs), but 52k edges outnumber half the bitset's words
  // (2400 x 38 / 2): the list is dropped, and BuildCodebook's rounds run on the bitset.
  const UnitSet dense = Mixture(2400, 32, 55, 0.001f, 19);
  std::vector<uint64_t> dense_adjacency(dense.n * ((dense.n + 63) / 64), 0);
  REQUIRE(LshSimilarityAdjacency(dense.unit.data(), dense.nonzero.data(), dense.n, dense.dim, 0.95f,
                                 dense_adjacency.data(), LshParams{}, &stats, nullptr, &edges)
              .ok());
  REQUIRE_FALSE(stats.exact);
  CHECK(stats.edges > dense.n * ((dense.n + 63) / 64) / 2);
  CHECK(edges.empty());
  CHECK(dense_adjacency == ExactGraph(dense, 0.95f));
  CodebookOptions lsh;
  lsh.search = CodebookSearch::kLsh;
  const absl::StatusOr<Codebook> fast = BuildCodebook(dense.raw, dense.dim, 0.95f, lsh);
  const absl::StatusOr<Codebook> exact = BuildCodebook(dense.raw, dense.dim, 0.95f);
  REQUIRE(fast.ok());
  REQUIRE(exact.ok());
  CHECK(fast->refs == exact->refs);
  CHECK(fast->entries == exact->entries);
}

TEST_CASE("BuildCodebook kLsh: the exact codebook when no pair is missed; valid always", "[cpu]") {
  CodebookOptions lsh;
  lsh.search = CodebookSearch::kLsh;
  // Tight clusters: hashing finds every pair, so the codebooks are equal bit for bit.
  const UnitSet tight = Mixture(3000, 32, 600, 0.01f, 5, /*zero_every=*/70);
  LshStats stats;
  REQUIRE(HashedGraph(tight, 0.98f, LshParams{}, &stats) == ExactGraph(tight, 0.98f));
  REQUIRE_FALSE(stats.exact);
  absl::StatusOr<Codebook> fast = BuildCodebook(tight.raw, tight.dim, 0.98f, lsh);
  absl::StatusOr<Codebook> exact = BuildCodebook(tight.raw, tight.dim, 0.98f);
  REQUIRE(fast.ok());
  REQUIRE(exact.ok());
  CHECK(fast->entries == exact->entries);
  CHECK(fast->refs == exact->refs);
  CHECK(fast->magnitudes == exact->magnitudes);

  // Loose clusters in chunks (hashed matching against thousands of entries): every vector's
  // entry still passes the edge test, and the codebook is about as small as the exact one.
  const UnitSet loose = Mixture(9000, 64, 3000, 0.12f, 9, /*zero_every=*/101);
  lsh.max_graph_vectors = 3000;
  CodebookOptions exact_chunks;
  exact_chunks.max_graph_vectors = 3000;
  fast = BuildCodebook(loose.raw, loose.dim, 0.95f, lsh);
  exact = BuildCodebook(loose.raw, loose.dim, 0.95f, exact_chunks);
  REQUIRE(fast.ok());
  REQUIRE(exact.ok());
  REQUIRE(fast->refs.size() == loose.n);
  for (size_t i = 0; i < loose.n; ++i) {
    const float* u = &loose.unit[i * loose.dim];
    if (!loose.nonzero[i]) {
      CHECK(fast->magnitudes[i] == 0.0f);
      continue;
    }
    const int64_t ok = MatchEntry(
        absl::MakeConstSpan(&fast->entries[size_t{fast->refs[i]} * loose.dim], loose.dim),
        loose.dim, u, 0.95f);
    CHECK(ok == 0);
    CHECK(fast->magnitudes[i] == exact->magnitudes[i]);
  }
  CHECK(fast->size() <= exact->size() * 1.02 + 1);
}

}  // namespace
}  // namespace cachemgr::compress
