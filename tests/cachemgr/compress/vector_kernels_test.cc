// Every instruction-set build of the compression kernels (vector_kernels.h) against a double
// reference and, bit for bit, against the baseline build; and the run-time choice of build.
// Run under the sanitizer builds (scripts/sanitize.sh), this is the check the per-function
// target_clones these kernels replaced never had: at -O0 and under ASan they corrupted the
// stack.
#include "cachemgr/compress/vector_kernels.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cachemgr/util/cpu_features.h"

namespace cachemgr::compress {
namespace {

std::vector<const VectorKernels*> AllBuilds() {
  std::vector<const VectorKernels*> builds = {&BaselineVectorKernels()};
  if (const VectorKernels* avx2 = Avx2FmaVectorKernels(); avx2 != nullptr) builds.push_back(avx2);
  return builds;
}

double Cosine(const float* a, const float* b, uint32_t dim) {
  double ab = 0.0, aa = 0.0, bb = 0.0;
  for (uint32_t k = 0; k < dim; ++k) {
    ab += double{a[k]} * b[k];
    aa += double{a[k]} * a[k];
    bb += double{b[k]} * b[k];
  }
  return aa == 0.0 || bb == 0.0 ? 0.0 : ab / std::sqrt(aa * bb);
}

// n unit vectors around `clusters` random directions (so that many cosines are near any theta),
// every fifth one a duplicate of its predecessor and every seventh zero.
std::vector<float> UnitVectors(size_t n, uint32_t dim, uint32_t clusters, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> centers(size_t{clusters} * dim);
  for (float& c : centers) c = normal(rng);
  std::vector<float> out(n * dim, 0.0f);
  for (size_t i = 0; i < n; ++i) {
    float* v = &out[i * dim];
    if (i % 7 == 6) continue;
    if (i % 5 == 4) {
      std::memcpy(v, v - dim, dim * sizeof(float));
      continue;
    }
    double sum = 0.0;
    for (uint32_t k = 0; k < dim; ++k) {
      v[k] = centers[(i % clusters) * dim + k] + 0.3f * normal(rng);
      sum += double{v[k]} * v[k];
    }
    for (uint32_t k = 0; k < dim; ++k) v[k] = static_cast<float>(v[k] / std::sqrt(sum));
  }
  return out;
}

// The kernel's input layout: blocks of eight vectors, [ceil(n / 8)][dim][8], zero-padded.
std::vector<float> Transposed(const std::vector<float>& unit, size_t n, uint32_t dim) {
  std::vector<float> out((n + 7) / 8 * 8 * dim, 0.0f);
  for (size_t i = 0; i < n; ++i) {
    for (uint32_t k = 0; k < dim; ++k) out[(i / 8) * 8 * dim + k * 8 + i % 8] = unit[i * dim + k];
  }
  return out;
}

bool Bit(const std::vector<uint64_t>& adjacency, size_t words, size_t i, size_t j) {
  return (adjacency[i * words + j / 64] >> (j % 64)) & 1;
}

TEST_CASE("the AVX2 build runs exactly where the CPU has AVX2 and FMA", "[cpu]") {
#if defined(__x86_64__)
  CHECK((Avx2FmaVectorKernels() != nullptr) == CpuSupportsAvx2Fma());
#endif
  const std::string selected = SelectedVectorKernels().name;
  CHECK(selected == (Avx2FmaVectorKernels() != nullptr ? "avx2_fma" : "baseline"));
  CHECK(std::string(BaselineVectorKernels().name) == "baseline");
}

TEST_CASE("similarity_pairs: edges are the cosines above theta, the same bits in every build",
          "[cpu]") {
  for (const uint32_t dim : {1u, 3u, 8u, 13u, 64u, 67u}) {
    for (const size_t n : {size_t{1}, size_t{7}, size_t{9}, size_t{70}, size_t{133}}) {
      for (const float theta : {0.5f, 0.9f, 1.0f}) {
        CAPTURE(dim, n, theta);
        const std::vector<float> unit = UnitVectors(n, dim, 4, dim * 1000 + n);
        const std::vector<float> transposed = Transposed(unit, n, dim);
        std::vector<uint8_t> nonzero(n);
        for (size_t i = 0; i < n; ++i) nonzero[i] = Cosine(&unit[i * dim], &unit[i * dim], dim) > 0;
        const size_t words = (n + 63) / 64;
        std::vector<uint64_t> baseline;
        for (const VectorKernels* build : AllBuilds()) {
          CAPTURE(build->name);
          std::vector<uint64_t> adjacency(n * words, 0);
          build->similarity_pairs(unit.data(), transposed.data(), nonzero.data(), n, dim, theta,
                                  adjacency.data());
          for (size_t i = 0; i < n; ++i) {
            CHECK_FALSE(Bit(adjacency, words, i, i));  // self-loops are the caller's
            for (size_t j = i + 1; j < n; ++j) {
              REQUIRE(Bit(adjacency, words, i, j) == Bit(adjacency, words, j, i));
              const bool identical = nonzero[i] && std::memcmp(&unit[i * dim], &unit[j * dim],
                                                               dim * sizeof(float)) == 0;
              const double cosine = Cosine(&unit[i * dim], &unit[j * dim], dim);
              if (identical) {
                CHECK(Bit(adjacency, words, i, j));
              } else if (std::abs(cosine - theta) > 1e-5) {
                CHECK(Bit(adjacency, words, i, j) == (theta < 1.0f && cosine > theta));
              }
            }
          }
          if (baseline.empty()) {
            baseline = adjacency;
          } else {
            CHECK(adjacency == baseline);
          }
        }
      }
    }
  }
}

TEST_CASE("match_entry: the most similar entry above theta, the same in every build", "[cpu]") {
  for (const uint32_t dim : {3u, 8u, 67u}) {
    for (const size_t count : {size_t{0}, size_t{1}, size_t{3}, size_t{4}, size_t{5}, size_t{17}}) {
      const std::vector<float> entries = UnitVectors(count, dim, 3, dim + count);
      const std::vector<float> queries = UnitVectors(40, dim, 3, 99 + dim);
      for (const float theta : {0.3f, 0.95f, 1.0f}) {
        for (size_t q = 0; q < 40; ++q) {
          CAPTURE(dim, count, theta, q);
          const float* unit = &queries[q * dim];
          // Reference: the best double cosine, when it clears theta by a margin.
          int64_t want = -1;
          double best = -2.0;
          for (size_t e = 0; e < count; ++e) {
            const double c = Cosine(unit, &entries[e * dim], dim);
            if (c > best + 1e-5) best = c, want = static_cast<int64_t>(e);
          }
          const int64_t got =
              BaselineVectorKernels().match_entry(entries.data(), count, dim, unit, theta);
          if (theta < 1.0f && want >= 0 && best > theta + 1e-5) {
            CHECK(got >= 0);
            if (got >= 0) CHECK(Cosine(unit, &entries[got * dim], dim) >= best - 1e-5);
          } else if (theta < 1.0f && (want < 0 || best < theta - 1e-5)) {
            CHECK(got == -1);
          }
          for (const VectorKernels* build : AllBuilds()) {
            CAPTURE(build->name);
            CHECK(build->match_entry(entries.data(), count, dim, unit, theta) == got);
          }
        }
      }
    }
  }
}

TEST_CASE("similar_listed_pairs: similarity_pairs' decisions on the listed pairs, every build",
          "[cpu]") {
  for (const uint32_t dim : {3u, 8u, 64u, 67u}) {
    const size_t n = 70;
    for (const float theta : {0.5f, 0.9f, 1.0f}) {
      CAPTURE(dim, theta);
      const std::vector<float> unit = UnitVectors(n, dim, 4, dim * 31);
      const std::vector<float> transposed = Transposed(unit, n, dim);
      const std::vector<uint8_t> nonzero(n, 1);  // zero vectors pass no test either way
      const size_t words = (n + 63) / 64;
      std::vector<uint64_t> want(n * words, 0);
      BaselineVectorKernels().similarity_pairs(unit.data(), transposed.data(), nonzero.data(), n,
                                               dim, theta, want.data());
      std::vector<uint32_t> pairs;  // every pair, in both orders for odd i
      for (uint32_t i = 0; i < n; ++i) {
        for (uint32_t j = i + 1; j < n; ++j) {
          pairs.push_back(i % 2 ? j : i);
          pairs.push_back(i % 2 ? i : j);
        }
      }
      size_t want_edges = 0;
      for (size_t i = 0; i < n; ++i) {
        for (size_t j = i + 1; j < n; ++j) want_edges += Bit(want, words, i, j) ? 1 : 0;
      }
      for (const VectorKernels* build : AllBuilds()) {
        CAPTURE(build->name);
        std::vector<uint64_t> got(n * words, 0);
        CHECK(build->similar_listed_pairs(unit.data(), dim, theta, pairs.data(), pairs.size() / 2,
                                          words, got.data()) == want_edges);
        CHECK(got == want);
      }
    }
  }
}

TEST_CASE("match_listed_entry: match_entry among the listed entries, every build", "[cpu]") {
  const uint32_t dim = 67;
  const size_t count = 17;
  const std::vector<float> entries = UnitVectors(count, dim, 3, 5);
  const std::vector<float> queries = UnitVectors(40, dim, 3, 6);
  std::vector<uint32_t> all(count), odd;
  for (uint32_t e = 0; e < count; ++e) {
    all[e] = e;
    if (e % 2) odd.push_back(e);
  }
  std::vector<float> odd_entries;
  for (uint32_t e : odd)
    odd_entries.insert(odd_entries.end(), &entries[e * dim], &entries[(e + 1) * dim]);
  for (const float theta : {0.3f, 0.95f, 1.0f}) {
    for (size_t q = 0; q < 40; ++q) {
      CAPTURE(theta, q);
      const float* unit = &queries[q * dim];
      const int64_t want =
          BaselineVectorKernels().match_entry(entries.data(), count, dim, unit, theta);
      const int64_t want_odd =
          BaselineVectorKernels().match_entry(odd_entries.data(), odd.size(), dim, unit, theta);
      for (const VectorKernels* build : AllBuilds()) {
        CAPTURE(build->name);
        CHECK(build->match_listed_entry(entries.data(), all.data(), count, dim, unit, theta) ==
              want);
        CHECK(build->match_listed_entry(entries.data(), odd.data(), odd.size(), dim, unit, theta) ==
              (want_odd < 0 ? -1 : int64_t{odd[want_odd]}));
        CHECK(build->match_listed_entry(entries.data(), all.data(), 0, dim, unit, theta) == -1);
      }
    }
  }
}

TEST_CASE("lsh_project: the projections within float rounding, the same bits in every build",
          "[cpu]") {
  for (const uint32_t dim : {1u, 13u, 64u}) {
    const size_t n = 9;
    const std::vector<float> rows = UnitVectors(n, dim, 3, dim);
    const std::vector<float> directions = UnitVectors(dim, kLshProjections, 5, 7 + dim);
    std::vector<float> baseline;
    for (const VectorKernels* build : AllBuilds()) {
      CAPTURE(dim, build->name);
      std::vector<float> out(n * kLshProjections, -1.0f);
      build->lsh_project(rows.data(), n, dim, directions.data(), out.data());
      for (size_t r = 0; r < n; ++r) {
        for (uint32_t p = 0; p < kLshProjections; ++p) {
          double want = 0.0;
          for (uint32_t k = 0; k < dim; ++k) {
            want += double{rows[r * dim + k]} * directions[size_t{k} * kLshProjections + p];
          }
          CHECK(std::abs(out[r * kLshProjections + p] - want) < 1e-5);
        }
      }
      if (baseline.empty()) {
        baseline = out;
      } else {
        CHECK(out == baseline);
      }
    }
  }
}

TEST_CASE("block_logits: query . key within float rounding, the same bits in every build",
          "[cpu]") {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const uint32_t head_dim : {1u, 7u, 64u, 67u}) {
    for (const uint32_t rows : {1u, 3u, 4u, 5u, 16u}) {
      CAPTURE(head_dim, rows);
      std::vector<float> queries(size_t{rows} * head_dim);
      std::vector<float> keys(size_t{head_dim} * kLogitsKeyBlock);  // [head_dim][8]
      for (float& x : queries) x = normal(rng);
      for (float& x : keys) x = normal(rng);
      const size_t stride = 24;  // wider than the block: the rest of a row stays untouched
      std::vector<float> baseline;
      for (const VectorKernels* build : AllBuilds()) {
        CAPTURE(build->name);
        std::vector<float> logits(rows * stride, -7.0f);
        build->block_logits(queries.data(), rows, head_dim, keys.data(), logits.data(), stride);
        for (uint32_t r = 0; r < rows; ++r) {
          for (uint32_t j = 0; j < stride; ++j) {
            if (j >= kLogitsKeyBlock) {
              CHECK(logits[r * stride + j] == -7.0f);
              continue;
            }
            double want = 0.0, magnitude = 0.0;
            for (uint32_t i = 0; i < head_dim; ++i) {
              want += double{queries[r * head_dim + i]} * keys[i * kLogitsKeyBlock + j];
              magnitude +=
                  std::abs(double{queries[r * head_dim + i]} * keys[i * kLogitsKeyBlock + j]);
            }
            CHECK(std::abs(logits[r * stride + j] - want) <= 1e-6 * (magnitude + 1.0));
          }
        }
        if (baseline.empty()) {
          baseline = logits;
        } else {
          CHECK(logits == baseline);
        }
      }
    }
  }
}

}  // namespace
}  // namespace cachemgr::compress
