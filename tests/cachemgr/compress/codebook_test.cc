#include "cachemgr/compress/codebook.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace cachemgr::compress {
namespace {

constexpr double kPi = 3.14159265358979323846;

float ExactMagnitude(const float* x, uint32_t dim) {
  double sum = 0.0;
  for (uint32_t k = 0; k < dim; ++k) sum += static_cast<double>(x[k]) * x[k];
  return static_cast<float>(std::sqrt(sum));
}

double Cosine(const float* a, const float* b, uint32_t dim) {
  double ab = 0.0, aa = 0.0, bb = 0.0;
  for (uint32_t k = 0; k < dim; ++k) {
    ab += static_cast<double>(a[k]) * b[k];
    aa += static_cast<double>(a[k]) * a[k];
    bb += static_cast<double>(b[k]) * b[k];
  }
  return ab / std::sqrt(aa * bb);
}

// Vectors in the plane at the given angles (degrees) with the given lengths.
std::vector<float> PlaneVectors(const std::vector<double>& degrees,
                                const std::vector<float>& lengths) {
  std::vector<float> out;
  for (size_t i = 0; i < degrees.size(); ++i) {
    out.push_back(static_cast<float>(lengths[i] * std::cos(degrees[i] * kPi / 180.0)));
    out.push_back(static_cast<float>(lengths[i] * std::sin(degrees[i] * kPi / 180.0)));
  }
  return out;
}

// `per_cluster` noisy copies of each of `clusters` random directions, interleaved (vector i is
// in cluster i % clusters), with random lengths. Regenerated until no pair's cosine lies within
// 1e-5 of theta, so float rounding cannot decide an edge.
std::vector<float> ClusteredVectors(uint32_t clusters, uint32_t per_cluster, uint32_t dim,
                                    float noise, float theta, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> length(0.5f, 4.0f);
  const uint32_t n = clusters * per_cluster;
  while (true) {
    std::vector<float> centers(clusters * dim);
    for (float& c : centers) c = normal(rng);
    std::vector<float> out(n * dim);
    for (uint32_t i = 0; i < n; ++i) {
      const float* c = &centers[(i % clusters) * dim];
      const float scale = length(rng) / ExactMagnitude(c, dim);
      for (uint32_t k = 0; k < dim; ++k) out[i * dim + k] = scale * (c[k] + noise * normal(rng));
    }
    bool clear = true;
    for (uint32_t i = 0; i < n && clear; ++i) {
      for (uint32_t j = i + 1; j < n && clear; ++j) {
        clear = std::abs(Cosine(&out[i * dim], &out[j * dim], dim) - theta) > 1e-5;
      }
    }
    if (clear) return out;
  }
}

// Algorithm 1 as printed, on a dense graph from double cosines (valid for inputs that keep
// every cosine away from theta): while G has an edge, pick argmax of the degrees, assign the
// pick's row, clear the rows and columns of the row's members.
struct Literal {
  std::vector<uint32_t> picks;
  std::vector<uint32_t> refs;
};
Literal LiteralAlgorithm1(const std::vector<float>& x, uint32_t dim, float theta) {
  const size_t n = x.size() / dim;
  std::vector<std::vector<uint8_t>> g(n, std::vector<uint8_t>(n, 0));
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < n; ++j)
      g[i][j] = i == j || Cosine(&x[i * dim], &x[j * dim], dim) > theta;
  }
  Literal out;
  out.refs.assign(n, std::numeric_limits<uint32_t>::max());
  while (true) {
    size_t best = 0, best_degree = 0;
    for (size_t i = 0; i < n; ++i) {
      const size_t degree = std::accumulate(g[i].begin(), g[i].end(), size_t{0});
      if (degree > best_degree) best = i, best_degree = degree;
    }
    if (best_degree == 0) break;
    const std::vector<uint8_t> row = g[best];
    for (size_t j = 0; j < n; ++j) {
      if (!row[j]) continue;
      out.refs[j] = static_cast<uint32_t>(out.picks.size());
      for (size_t k = 0; k < n; ++k) g[j][k] = g[k][j] = 0;
    }
    out.picks.push_back(static_cast<uint32_t>(best));
  }
  return out;
}

// Entry `entry` is vector i normalised as eq. 8 prescribes: x / |x|, with |x| in double.
void CheckUnitVectorOf(const Codebook& cb, uint32_t entry, const std::vector<float>& x,
                       uint32_t i) {
  const uint32_t dim = cb.dim;
  double sum = 0.0;
  for (uint32_t k = 0; k < dim; ++k) sum += static_cast<double>(x[i * dim + k]) * x[i * dim + k];
  const double m = std::sqrt(sum);
  for (uint32_t k = 0; k < dim; ++k) {
    CHECK(cb.entries[entry * dim + k] == static_cast<float>(x[i * dim + k] / m));
  }
}

TEST_CASE("three tight clusters give exactly three entries", "[cpu]") {
  const uint32_t dim = 16, per_cluster = 10;
  std::mt19937 rng(7);
  std::normal_distribution<float> noise(0.0f, 0.01f);
  std::uniform_real_distribution<float> length(0.5f, 3.0f);
  std::vector<float> x;
  for (uint32_t i = 0; i < 3 * per_cluster; ++i) {  // vector i is near axis i % 3
    const float m = length(rng);
    for (uint32_t k = 0; k < dim; ++k) x.push_back(m * ((k == i % 3 ? 1.0f : 0.0f) + noise(rng)));
  }
  absl::StatusOr<Codebook> cb = BuildCodebook(x, dim, 0.95f);
  REQUIRE(cb.ok());
  REQUIRE(cb->size() == 3);
  REQUIRE(cb->refs.size() == 3 * per_cluster);
  // Every cluster is a clique of equal degree: rounds pick vectors 0, 1, 2 in turn.
  for (uint32_t i = 0; i < 3 * per_cluster; ++i) {
    CHECK(cb->refs[i] == i % 3);
    CHECK(cb->magnitudes[i] == ExactMagnitude(&x[i * dim], dim));
  }
  for (uint32_t c = 0; c < 3; ++c) CheckUnitVectorOf(*cb, c, x, c);
}

TEST_CASE("Algorithm 1 on a hand-worked graph: remaining degree, ties to the lowest index",
          "[cpu]") {
  // theta = cos 10 deg: vectors 7 deg apart are neighbours, 14 deg apart are not.
  //   0: 20  1: 13  2: 27  3: 34  4: 41   5: 100  6: 93  7: 107
  // Edges 0-1, 0-2, 2-3, 3-4, 5-6, 5-7. Degrees with self-loops: 3 2 3 3 2 3 2 2.
  // Round 0: ties at 3 between 0, 2, 3, 5 -> 0; removes {0, 1, 2}; vertex 3 drops to 2.
  // Round 1: 5 (degree 3 in the remaining graph; by original degree 3 would win) -> {5, 6, 7}.
  // Round 2: 3 -> {3, 4}.
  const std::vector<float> x = PlaneVectors({20, 13, 27, 34, 41, 100, 93, 107},
                                            {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 0.5f, 6.0f, 7.0f});
  const float theta = static_cast<float>(std::cos(10.0 * kPi / 180.0));
  absl::StatusOr<Codebook> cb = BuildCodebook(x, 2, theta);
  REQUIRE(cb.ok());
  REQUIRE(cb->size() == 3);
  CHECK(cb->refs == std::vector<uint32_t>{0, 0, 0, 2, 2, 1, 1, 1});
  CheckUnitVectorOf(*cb, 0, x, 0);
  CheckUnitVectorOf(*cb, 1, x, 5);
  CheckUnitVectorOf(*cb, 2, x, 3);
  for (uint32_t i = 0; i < 8; ++i) CHECK(cb->magnitudes[i] == ExactMagnitude(&x[2 * i], 2));
}

TEST_CASE("greedy build matches a literal dense Algorithm 1", "[cpu]") {
  struct Case {
    uint32_t clusters, per_cluster, dim;
    float noise, theta;
  };
  const std::vector<Case> cases = {{4, 12, 8, 0.3f, 0.9f},
                                   {6, 20, 16, 0.15f, 0.95f},
                                   {3, 40, 5, 0.4f, 0.8f},
                                   {10, 9, 33, 0.1f, 0.98f}};
  uint32_t seed = 1;
  for (const Case& c : cases) {
    for (int rep = 0; rep < 3; ++rep, ++seed) {
      INFO("case dim " << c.dim << " seed " << seed);
      const std::vector<float> x =
          ClusteredVectors(c.clusters, c.per_cluster, c.dim, c.noise, c.theta, seed);
      const Literal want = LiteralAlgorithm1(x, c.dim, c.theta);
      absl::StatusOr<Codebook> cb = BuildCodebook(x, c.dim, c.theta);
      REQUIRE(cb.ok());
      REQUIRE(cb->size() == want.picks.size());
      CHECK(cb->refs == want.refs);
      for (uint32_t e = 0; e < cb->size(); ++e) CheckUnitVectorOf(*cb, e, x, want.picks[e]);
    }
  }
}

TEST_CASE("reconstruction stays within theta of every vector", "[cpu]") {
  const uint32_t dim = 24;
  for (float theta : {0.8f, 0.9f, 0.95f}) {
    const std::vector<float> x = ClusteredVectors(5, 30, dim, 0.35f, theta, 99);
    absl::StatusOr<Codebook> cb = BuildCodebook(x, dim, theta);
    REQUIRE(cb.ok());
    CHECK(cb->size() < 150);  // something was merged
    std::vector<float> out(x.size());
    ReconstructCodebook(*cb, absl::MakeSpan(out));
    for (uint32_t i = 0; i < 150; ++i) {
      INFO("theta " << theta << " vector " << i);
      CHECK(Cosine(&out[i * dim], &x[i * dim], dim) > theta);
      CHECK(ExactMagnitude(&out[i * dim], dim) ==
            Approx(ExactMagnitude(&x[i * dim], dim)).epsilon(1e-6));
    }
  }
}

TEST_CASE("theta = 1 merges only exact duplicates", "[cpu]") {
  const std::vector<float> a = {0.3f, -1.2f, 2.5f, 0.7f};
  std::vector<float> near_copy = a;
  near_copy[0] += 1e-5f;  // cosine rounds to 1 in float, but not a duplicate
  std::vector<float> x;
  const std::vector<float>& near = near_copy;
  for (const std::vector<float>* v : {&a, &a, &near}) x.insert(x.end(), v->begin(), v->end());
  for (float value : a) x.push_back(2.0f * value);  // same direction, exactly
  absl::StatusOr<Codebook> cb = BuildCodebook(x, 4, 1.0f);
  REQUIRE(cb.ok());
  CHECK(cb->size() == 2);
  CHECK(cb->refs == std::vector<uint32_t>{0, 0, 1, 0});
  CHECK(cb->magnitudes[3] == 2.0f * cb->magnitudes[0]);
  // Just below 1, the near-duplicate joins too.
  cb = BuildCodebook(x, 4, 0.999f);
  REQUIRE(cb.ok());
  CHECK(cb->size() == 1);
}

TEST_CASE("zero vectors are similar to nothing but themselves", "[cpu]") {
  const std::vector<float> x = {0, 0, 0, 1, 0, 0, 0, 0, 0, 2, 0, 0};
  absl::StatusOr<Codebook> cb = BuildCodebook(x, 3, 0.5f);
  REQUIRE(cb.ok());
  // Degrees 1 2 1 2: the two e0 vectors first, then each zero vector alone.
  REQUIRE(cb->size() == 3);
  CHECK(cb->refs == std::vector<uint32_t>{1, 0, 2, 0});
  CHECK(cb->magnitudes == std::vector<float>{0, 1, 0, 2});
  CHECK(cb->entries == std::vector<float>{1, 0, 0, 0, 0, 0, 0, 0, 0});
  std::vector<float> out(x.size(), -1.0f);
  ReconstructCodebook(*cb, absl::MakeSpan(out));
  CHECK(out == x);
}

TEST_CASE("MatchEntry picks the most similar entry above theta", "[cpu]") {
  absl::StatusOr<Codebook> cb = BuildCodebook(std::vector<float>{1, 0, 0, 0, 3, 0}, 3, 0.7f);
  REQUIRE(cb.ok());
  REQUIRE(cb->size() == 2);  // e0 = x, e1 = y
  auto match = [&](std::vector<float> x, float theta = 0.7f) {
    std::vector<float> unit(3);
    float m = 0;
    REQUIRE(NormalizeVector(x.data(), 3, unit.data(), &m));
    return MatchEntry(cb->entries, 3, unit.data(), theta);
  };
  CHECK(match({2, 2, 0}) == 0);     // cos 0.707 with both: the tie keeps entry 0
  CHECK(match({1, 1.1f, 0}) == 1);  // closer to e1
  CHECK(match({0, 0, 5}) == -1);    // orthogonal
  CHECK(match({0, 0, 0}) == -1);    // zero vector
  CHECK(match({2, 2, 0}, 0.75f) == -1);
  CHECK(match({0, 7, 0}, 1.0f) == 1);  // theta 1: identical unit vectors only
  CHECK(match({0, 7, 0.001f}, 1.0f) == -1);
  CHECK(MatchEntry({}, 3, cb->entries.data(), 0.5f) == -1);  // no entries
  float m = 0;
  std::vector<float> unit(2);
  const std::vector<float> inf = {1, std::numeric_limits<float>::infinity()};
  CHECK_FALSE(NormalizeVector(inf.data(), 2, unit.data(), &m));
}

TEST_CASE("more vectors than one graph: chunks match earlier entries, then Algorithm 1", "[cpu]") {
  // Chunk 0 = {x, 2x, y, z}; chunk 1 = {3y, w, 2w, -x}: 3y joins y's entry, the w pair and -x
  // get new entries built on chunk 1's unmatched vectors alone.
  const std::vector<float> x = {
      1, 0, 0, 0, 2, 0, 0, 0, 0, 1, 0, 0, 0,  0, 1, 0,  // chunk 0
      0, 3, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, -1, 0, 0, 0,  // chunk 1
  };
  absl::StatusOr<Codebook> chunked = BuildCodebook(x, 4, 0.9f, {.max_graph_vectors = 4});
  REQUIRE(chunked.ok());
  CHECK(chunked->size() == 5);  // x, y, z from chunk 0; w, -x from chunk 1
  CHECK(chunked->refs == std::vector<uint32_t>{0, 0, 1, 2, 1, 3, 3, 4});
  CHECK(chunked->magnitudes == std::vector<float>{1, 2, 1, 1, 3, 1, 2, 1});
  absl::StatusOr<Codebook> whole = BuildCodebook(x, 4, 0.9f);
  REQUIRE(whole.ok());
  CHECK(whole->size() == 5);  // the same cover here, found in one graph

  // Random clusters, chunked at several sizes: every vector within theta of its entry.
  std::mt19937 rng(21);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const uint32_t dim = 16, n = 600;
  std::vector<float> centers(8 * dim), v(n * dim);
  for (float& c : centers) c = normal(rng);
  for (uint32_t i = 0; i < n; ++i) {
    for (uint32_t k = 0; k < dim; ++k)
      v[i * dim + k] = centers[(i % 8) * dim + k] + 0.05f * normal(rng);
  }
  for (uint32_t chunk : {7u, 64u, 599u, 600u}) {
    absl::StatusOr<Codebook> cb = BuildCodebook(v, dim, 0.95f, {.max_graph_vectors = chunk});
    REQUIRE(cb.ok());
    REQUIRE(cb->refs.size() == n);
    CHECK(cb->size() >= 8);
    CHECK(cb->size() < n / 4);
    for (uint32_t i = 0; i < n; ++i) {
      const float* e = &cb->entries[cb->refs[i] * dim];
      double dot = 0, norm = 0;
      for (uint32_t k = 0; k < dim; ++k) {
        dot += double{e[k]} * v[i * dim + k];
        norm += double{v[i * dim + k]} * v[i * dim + k];
      }
      CHECK(dot / std::sqrt(norm) > 0.95 - 1e-6);
    }
  }
}

TEST_CASE("invalid arguments", "[cpu]") {
  const std::vector<float> x = {1, 0, 0, 1};
  for (float theta : {0.0f, -0.5f, 1.5f, std::numeric_limits<float>::quiet_NaN()}) {
    absl::StatusOr<Codebook> cb = BuildCodebook(x, 2, theta);
    REQUIRE_FALSE(cb.ok());
    CHECK(cb.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(cb.status().message()).find("theta") != std::string::npos);
  }
  CHECK(BuildCodebook(x, 3, 0.9f).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(BuildCodebook(x, 0, 0.9f).status().code() == absl::StatusCode::kInvalidArgument);
  const std::vector<float> inf = {1, std::numeric_limits<float>::infinity()};
  CHECK(BuildCodebook(inf, 2, 0.9f).status().code() == absl::StatusCode::kInvalidArgument);

  // Past one graph's size the build goes by chunks instead of refusing.
  const std::vector<float> many(kMaxGraphVectors + 5, 1.0f);
  absl::StatusOr<Codebook> big = BuildCodebook(many, 1, 0.9f);
  REQUIRE(big.ok());
  CHECK(big->size() == 1);
  CHECK(BuildCodebook(x, 2, 0.9f, {.max_graph_vectors = 0}).status().code() ==
        absl::StatusCode::kInvalidArgument);

  absl::StatusOr<Codebook> empty = BuildCodebook({}, 4, 0.9f);
  REQUIRE(empty.ok());
  CHECK(empty->size() == 0);
  CHECK(empty->dim == 4);
}

}  // namespace
}  // namespace cachemgr::compress
