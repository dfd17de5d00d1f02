#include "cachemgr/compress/scoring.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace cachemgr::compress {
namespace {

ModelShape Shape(uint32_t q_heads, uint32_t kv_heads, uint32_t head_dim) {
  ModelShape shape;
  shape.num_layers = 1;
  shape.num_q_heads = q_heads;
  shape.num_kv_heads = kv_heads;
  shape.head_dim = head_dim;
  shape.rope_style = RopeStyle::kNone;
  return shape;
}

PolicyConfig WindowPolicy(uint32_t window, WindowNormalization normalization,
                          Pooling pooling = Pooling::kNone, uint32_t kernel = 1,
                          GqaMode gqa = GqaMode::kRepeat) {
  PolicyConfig policy;
  policy.scoring = Scoring::kWindow;
  policy.window = window;
  policy.normalization = normalization;
  policy.pooling = pooling;
  policy.pool_kernel = kernel;
  policy.gqa = gqa;
  return policy;
}

// One head, head_dim 1, q = 1 and keys ln(1..4): the logits are ln(w) and the softmax over a
// causal prefix is w / sum(w). Window of 2 queries at positions 2 and 3:
//   query at 2: (1, 2, 3) / 6;  query at 3: (1, 2, 3, 4) / 10.
//   sums = (1/6 + 0.1, 2/6 + 0.2, 3/6 + 0.3, 0.4).
struct TinyCase {
  std::vector<float> keys = {0.0f, std::log(2.0f), std::log(3.0f), std::log(4.0f)};
  std::vector<float> queries = {1.0f, 1.0f};
  std::vector<float> values = std::vector<float>(4, 0.0f);
  LayerInput Layer() const {
    LayerInput layer;
    layer.keys = keys.data();
    layer.values = values.data();
    layer.queries = queries.data();
    layer.num_queries = 2;
    return layer;
  }
};

TEST_CASE("column sums on a hand-worked attention", "[cpu]") {
  TinyCase tiny;
  std::vector<float> sums;
  AttentionColumnSums(Shape(1, 1, 1), 4, tiny.keys.data(), tiny.queries.data(), 2, &sums);
  REQUIRE(sums.size() == 4);
  CHECK(sums[0] == Approx(1.0 / 6 + 0.1).epsilon(1e-6));
  CHECK(sums[1] == Approx(2.0 / 6 + 0.2).epsilon(1e-6));
  CHECK(sums[2] == Approx(3.0 / 6 + 0.3).epsilon(1e-6));
  CHECK(sums[3] == Approx(0.4).epsilon(1e-6));
}

TEST_CASE("eq. 2 literal divides by l - a; plain sum does not", "[cpu]") {
  TinyCase tiny;
  const WindowSplit split = SplitWindow(4, 2);  // context = tokens 0, 1
  auto literal = ScoreLayer(Shape(1, 1, 1), WindowPolicy(2, WindowNormalization::kLiteral),
                            tiny.Layer(), 0, split, false);
  REQUIRE(literal.ok());
  REQUIRE(literal->scores.size() == 2);
  CHECK(literal->num_heads == 1);
  CHECK(literal->scores[0] == Approx((1.0 / 6 + 0.1) / 4).epsilon(1e-6));
  CHECK(literal->scores[1] == Approx((2.0 / 6 + 0.2) / 3).epsilon(1e-6));
  auto sum = ScoreLayer(Shape(1, 1, 1), WindowPolicy(2, WindowNormalization::kSum), tiny.Layer(), 0,
                        split, false);
  REQUIRE(sum.ok());
  CHECK(sum->scores[0] == Approx(1.0 / 6 + 0.1).epsilon(1e-6));
  CHECK(sum->scores[1] == Approx(2.0 / 6 + 0.2).epsilon(1e-6));

  std::vector<float> row = {4, 6, 2};
  DivideByDistanceToEnd(5, absl::MakeSpan(row));  // divisors 5, 4, 3
  CHECK(row == std::vector<float>{0.8f, 1.5f, 2.0f / 3.0f});
}

TEST_CASE("pooling: avg counts zero padding (avg_pool1d), max ignores it", "[cpu]") {
  const std::vector<float> in = {1, 2, 3, 4, 5};
  std::vector<float> out(5);
  Pool1d(Pooling::kAvg, 3, in, absl::MakeSpan(out));
  CHECK(out[0] == Approx(1.0));  // (0 + 1 + 2) / 3
  CHECK(out[1] == Approx(2.0));
  CHECK(out[2] == Approx(3.0));
  CHECK(out[3] == Approx(4.0));
  CHECK(out[4] == Approx(3.0));  // (4 + 5 + 0) / 3
  Pool1d(Pooling::kAvg, 5, in, absl::MakeSpan(out));
  CHECK(out[0] == Approx(1.2));  // (1 + 2 + 3) / 5
  CHECK(out[1] == Approx(2.0));
  CHECK(out[2] == Approx(3.0));
  CHECK(out[3] == Approx(2.8));
  CHECK(out[4] == Approx(2.4));
  Pool1d(Pooling::kMax, 3, in, absl::MakeSpan(out));
  CHECK(out == std::vector<float>{2, 3, 4, 5, 5});
  Pool1d(Pooling::kNone, 5, in, absl::MakeSpan(out));
  CHECK(out == in);
  // Kernel wider than the row.
  const std::vector<float> two = {1, 3};
  std::vector<float> two_out(2);
  Pool1d(Pooling::kAvg, 5, two, absl::MakeSpan(two_out));
  CHECK(two_out[0] == Approx(0.8));
  CHECK(two_out[1] == Approx(0.8));
  Pool1d(Pooling::kMax, 7, std::vector<float>{-1, -3, -2}, absl::MakeSpan(out).subspan(0, 3));
  CHECK(out[0] == -1.0f);
  CHECK(out[2] == -1.0f);
}

TEST_CASE("pooling runs over the context columns only", "[cpu]") {
  // Precomputed sums for 6 tokens, window 2: context = 4 tokens; the window's large values
  // must not leak into the pooled edge.
  const std::vector<float> scores = {1, 1, 1, 1, 100, 100};
  LayerInput layer;
  std::vector<float> kv(6);
  layer.keys = kv.data();
  layer.values = kv.data();
  layer.scores = scores.data();
  auto result =
      ScoreLayer(Shape(1, 1, 1), WindowPolicy(2, WindowNormalization::kSum, Pooling::kAvg, 3),
                 layer, 0, SplitWindow(6, 2), false);
  REQUIRE(result.ok());
  REQUIRE(result->scores.size() == 4);
  CHECK(result->scores[0] == Approx(2.0 / 3));
  CHECK(result->scores[1] == Approx(1.0));
  CHECK(result->scores[3] == Approx(2.0 / 3));
}

TEST_CASE("GQA: group mean averages a KV head's query heads, repeat keeps them", "[cpu]") {
  // 4 query heads, 2 KV heads, 5 tokens, window 1 (context 4), precomputed sums.
  const std::vector<float> scores = {
      1, 0, 0, 0, 9,  // q0 (kv 0)
      0, 3, 0, 0, 9,  // q1 (kv 0)
      0, 0, 2, 0, 9,  // q2 (kv 1)
      0, 0, 0, 4, 9,  // q3 (kv 1)
  };
  std::vector<float> kv(5 * 2);
  LayerInput layer;
  layer.keys = kv.data();
  layer.values = kv.data();
  layer.scores = scores.data();
  const WindowSplit split = SplitWindow(5, 1);
  auto mean =
      ScoreLayer(Shape(4, 2, 1),
                 WindowPolicy(1, WindowNormalization::kSum, Pooling::kNone, 1, GqaMode::kGroupMean),
                 layer, 0, split, false);
  REQUIRE(mean.ok());
  CHECK(mean->num_heads == 2);
  CHECK(mean->scores == std::vector<float>{0.5f, 1.5f, 0, 0, 0, 0, 1.0f, 2.0f});
  auto repeat =
      ScoreLayer(Shape(4, 2, 1),
                 WindowPolicy(1, WindowNormalization::kSum, Pooling::kNone, 1, GqaMode::kRepeat),
                 layer, 0, split, false);
  REQUIRE(repeat.ok());
  CHECK(repeat->num_heads == 4);
  CHECK(repeat->scores == std::vector<float>{1, 0, 0, 0, 0, 3, 0, 0, 0, 0, 2, 0, 0, 0, 0, 4});
}

TEST_CASE("accumulated scoring ignores normalization and pooling; NaN becomes -inf", "[cpu]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> scores = {5, 1, nan, 2, 7};
  std::vector<float> kv(5);
  LayerInput layer;
  layer.keys = kv.data();
  layer.values = kv.data();
  layer.scores = scores.data();
  PolicyConfig policy = WindowPolicy(1, WindowNormalization::kLiteral, Pooling::kAvg, 3);
  policy.scoring = Scoring::kAccumulated;
  auto result = ScoreLayer(Shape(1, 1, 1), policy, layer, 0, SplitWindow(5, 1), false);
  REQUIRE(result.ok());
  REQUIRE(result->scores.size() == 4);
  CHECK(result->scores[0] == 5.0f);
  CHECK(result->scores[1] == 1.0f);
  CHECK(result->scores[2] == -std::numeric_limits<float>::infinity());
  CHECK(result->scores[3] == 2.0f);
}

TEST_CASE("LMBA is the mean over query heads of the raw context sums' minimum budget", "[cpu]") {
  const std::vector<float> scores = {
      5, 1, 2, 2, 100,  // head 0: tau 0.9 of 10 -> 3 tokens
      1, 1, 1, 1, 100,  // head 1: 0.9 of 4 -> 4 tokens
  };
  std::vector<float> kv(5);
  LayerInput layer;
  layer.keys = kv.data();
  layer.values = kv.data();
  layer.scores = scores.data();
  PolicyConfig policy = WindowPolicy(1, WindowNormalization::kLiteral, Pooling::kAvg, 3);
  policy.zigzag_tau = 0.9;
  auto result = ScoreLayer(Shape(2, 1, 1), policy, layer, 0, SplitWindow(5, 1), true);
  REQUIRE(result.ok());
  CHECK(result->lmba == Approx(3.5));
}

TEST_CASE("missing queries and scores, bad num_queries", "[cpu]") {
  std::vector<float> kv(4);
  LayerInput layer;
  layer.keys = kv.data();
  layer.values = kv.data();
  auto missing = ScoreLayer(Shape(1, 1, 1), WindowPolicy(2, WindowNormalization::kSum), layer, 3,
                            SplitWindow(4, 2), false);
  CHECK(missing.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(missing.status().message()).rfind("input.layers[3]", 0) == 0);
  std::vector<float> q(8);
  layer.queries = q.data();
  layer.num_queries = 5;
  auto too_many = ScoreLayer(Shape(1, 1, 1), WindowPolicy(2, WindowNormalization::kSum), layer, 0,
                             SplitWindow(4, 2), false);
  CHECK(too_many.status().code() == absl::StatusCode::kInvalidArgument);
}

// Straightforward double-precision reference of step 1.
std::vector<double> ReferenceSums(const ModelShape& shape, uint32_t n, const std::vector<float>& k,
                                  const std::vector<float>& q, uint32_t nq) {
  const uint32_t d = shape.head_dim;
  const uint32_t group = shape.num_q_heads / shape.num_kv_heads;
  std::vector<double> sums(static_cast<size_t>(shape.num_q_heads) * n, 0.0);
  for (uint32_t h = 0; h < shape.num_q_heads; ++h) {
    const uint32_t g = h / group;
    for (uint32_t j = 0; j < nq; ++j) {
      const uint32_t p = n - nq + j;
      std::vector<double> logits(p + 1);
      double max_logit = -1e300;
      for (uint32_t t = 0; t <= p; ++t) {
        double dot = 0;
        for (uint32_t i = 0; i < d; ++i) {
          dot += static_cast<double>(q[(static_cast<size_t>(j) * shape.num_q_heads + h) * d + i]) *
                 k[(static_cast<size_t>(t) * shape.num_kv_heads + g) * d + i];
        }
        logits[t] = dot / std::sqrt(static_cast<double>(d));
        max_logit = std::max(max_logit, logits[t]);
      }
      double total = 0;
      for (double& l : logits) total += (l = std::exp(l - max_logit));
      for (uint32_t t = 0; t <= p; ++t) sums[static_cast<size_t>(h) * n + t] += logits[t] / total;
    }
  }
  return sums;
}

TEST_CASE("column sums match a double reference (GQA, ragged sizes)", "[cpu]") {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  struct Case {
    uint32_t q_heads, kv_heads, d, n, nq;
  };
  for (const Case& c : {Case{4, 2, 16, 37, 5}, Case{8, 8, 8, 64, 64}, Case{6, 2, 12, 101, 17},
                        Case{2, 1, 128, 300, 32}, Case{1, 1, 3, 1, 1}}) {
    const ModelShape shape = Shape(c.q_heads, c.kv_heads, c.d);
    std::vector<float> k(static_cast<size_t>(c.n) * c.kv_heads * c.d);
    std::vector<float> q(static_cast<size_t>(c.nq) * c.q_heads * c.d);
    for (float& v : k) v = normal(rng);
    for (float& v : q) v = normal(rng);
    std::vector<float> sums;
    AttentionColumnSums(shape, c.n, k.data(), q.data(), c.nq, &sums);
    const std::vector<double> want = ReferenceSums(shape, c.n, k, q, c.nq);
    REQUIRE(sums.size() == want.size());
    double total = 0;
    for (size_t i = 0; i < sums.size(); ++i) {
      INFO("case n=" << c.n << " index " << i);
      CHECK(sums[i] == Approx(want[i]).epsilon(2e-5).margin(1e-6));
      total += sums[i];
    }
    CHECK(total == Approx(static_cast<double>(c.q_heads) * c.nq).epsilon(1e-5));
  }
}

TEST_CASE("extreme logits stay finite", "[cpu]") {
  // Huge key norms: the softmax is one-hot and nothing underflows into NaN.
  const ModelShape shape = Shape(1, 1, 2);
  const std::vector<float> k = {100, 0, -100, 0, 0, 100, 50, 50};
  const std::vector<float> q = {30, 0};
  std::vector<float> sums;
  AttentionColumnSums(shape, 4, k.data(), q.data(), 1, &sums);
  CHECK(sums[0] == Approx(1.0));
  CHECK(sums[1] == Approx(0.0).margin(1e-30));  // exp clamps at e^-87, no denormals
  CHECK(sums[2] == Approx(0.0).margin(1e-6));
  CHECK(std::isfinite(sums[3]));
}

}  // namespace
}  // namespace cachemgr::compress
