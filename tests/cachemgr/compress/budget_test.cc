#include "cachemgr/compress/budget.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace cachemgr::compress {
namespace {

double Mean(const std::vector<double>& v) {
  return std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

void CheckRatios(const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("layer " << i);
    CHECK(got[i] == Approx(want[i]).margin(1e-12));
  }
}

TEST_CASE("window split", "[cpu]") {
  const WindowSplit split = SplitWindow(10, 4);
  CHECK(split.num_tokens == 10);
  CHECK(split.window == 4);
  CHECK(split.context == 6);
  const WindowSplit short_one = SplitWindow(3, 4);  // window longer than the sequence
  CHECK(short_one.window == 3);
  CHECK(short_one.context == 0);
  CHECK(SplitWindow(5, 0).context == 5);
}

TEST_CASE("context ratio r_c = (r l - l_w) / l_c with its edge cases", "[cpu]") {
  const WindowSplit split = SplitWindow(100, 20);  // l_c = 80
  CHECK(ContextRatio(0.5, split) == Approx(30.0 / 80.0));
  CHECK(ContextRatio(1.0, split) == 1.0);
  CHECK(ContextRatio(0.2, split) == 0.0);  // r l == l_w: the window alone
  CHECK(ContextRatio(0.1, split) == 0.0);  // r l < l_w
  CHECK(ContextRatio(0.3, split) == Approx(10.0 / 80.0));
  CHECK(ContextRatio(0.5, SplitWindow(10, 32)) == 1.0);  // l <= l_w: keep all
  CHECK(ContextRatio(0.5, SplitWindow(10, 0)) == Approx(0.5));
}

TEST_CASE("pyramid ratios, eq. 5-6 corrected", "[cpu]") {
  const double beta = 0.05;
  // beta < r_c <= alpha: r_c(0) = 2 r_c - beta, r_c(m-1) = beta.
  CheckRatios(PyramidContextRatios(0.3, 5, beta), {0.55, 0.425, 0.3, 0.175, 0.05});
  // r_c == alpha = 0.525: the two cases meet at r_c(0) = 1.
  CheckRatios(PyramidContextRatios(0.525, 5, beta), {1.0, 0.7625, 0.525, 0.2875, 0.05});
  // alpha < r_c <= 1: r_c(0) = 1, r_c(m-1) = 2 r_c - 1.
  CheckRatios(PyramidContextRatios(0.8, 5, beta), {1.0, 0.9, 0.8, 0.7, 0.6});
  CheckRatios(PyramidContextRatios(1.0, 3, beta), {1.0, 1.0, 1.0});
  // r_c <= beta: uniform (including r_c == beta and r_c == 0).
  CheckRatios(PyramidContextRatios(0.04, 4, beta), {0.04, 0.04, 0.04, 0.04});
  CheckRatios(PyramidContextRatios(0.05, 3, beta), {0.05, 0.05, 0.05});
  CheckRatios(PyramidContextRatios(0.0, 2, beta), {0.0, 0.0});
  // One layer: r_c itself.
  CheckRatios(PyramidContextRatios(0.3, 1, beta), {0.3});
  // Two layers: the endpoints.
  CheckRatios(PyramidContextRatios(0.3, 2, beta), {0.55, 0.05});
}

TEST_CASE("pyramid ratios average to r_c and decrease", "[cpu]") {
  for (double beta : {0.0, 0.05, 0.2}) {
    for (uint32_t layers : {1u, 2u, 7u, 32u}) {
      for (double rc = 0.0; rc <= 1.0 + 1e-12; rc += 0.01) {
        const std::vector<double> ratios = PyramidContextRatios(rc, layers, beta);
        INFO("beta " << beta << " layers " << layers << " r_c " << rc);
        CHECK(Mean(ratios) == Approx(rc).margin(1e-12));
        for (size_t l = 0; l < ratios.size(); ++l) {
          CHECK(ratios[l] >= 0.0);
          CHECK(ratios[l] <= 1.0 + 1e-12);
          if (l > 0) CHECK(ratios[l] <= ratios[l - 1] + 1e-12);
        }
      }
    }
  }
}

TEST_CASE("kept count is floor(r_c(lambda) * l_c), robust to representation error", "[cpu]") {
  CHECK(KeptContextCount(0.29, 100) == 29);  // 0.29 * 100 == 28.999999999999996 in double
  CHECK(KeptContextCount(0.375, 80) == 30);
  CHECK(KeptContextCount(0.3799, 80) == 30);
  CHECK(KeptContextCount(1.0, 80) == 80);
  CHECK(KeptContextCount(1.0000001, 5) == 5);
  CHECK(KeptContextCount(0.0, 80) == 0);
  CHECK(KeptContextCount(0.5, 0) == 0);
  CHECK(KeptContextCount(std::nan(""), 10) == 0);
}

uint32_t ReferenceMinimumBudget(std::vector<float> mass, double tau) {
  double total = 0.0;
  for (float& m : mass) {
    m = m > 0.0f ? m : 0.0f;
    total += m;
  }
  if (!(tau * total > 0.0)) return 0;
  std::sort(mass.begin(), mass.end(), std::greater<float>());
  double sum = 0.0;
  for (size_t i = 0; i < mass.size(); ++i) {
    sum += mass[i];
    if (sum >= tau * total) return static_cast<uint32_t>(i + 1);
  }
  return static_cast<uint32_t>(mass.size());
}

TEST_CASE("head minimum budget (LMBA) counts the fewest top tokens reaching tau", "[cpu]") {
  std::vector<float> scratch;
  const std::vector<float> mass = {1, 5, 2, 2};        // total 10
  CHECK(HeadMinimumBudget(mass, 0.9, &scratch) == 3);  // 5 + 2 + 2 = 9
  CHECK(HeadMinimumBudget(mass, 0.5, &scratch) == 1);  // 5
  CHECK(HeadMinimumBudget(mass, 0.51, &scratch) == 2);
  CHECK(HeadMinimumBudget(mass, 1.0, &scratch) == 4);
  CHECK(HeadMinimumBudget(std::vector<float>{0, 0, 0}, 0.9, &scratch) == 0);
  CHECK(HeadMinimumBudget(std::vector<float>{}, 0.9, &scratch) == 0);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(HeadMinimumBudget(std::vector<float>{-1, nan, 4}, 1.0, &scratch) == 1);
  CHECK(HeadMinimumBudget(std::vector<float>{3, 3, 3, 3}, 0.5, &scratch) == 2);

  std::mt19937 rng(7);
  std::exponential_distribution<float> dist(1.0f);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<float> random(1 + rng() % 3000);
    for (float& m : random) m = dist(rng) * dist(rng);
    for (double tau : {0.1, 0.5, 0.9, 0.99, 1.0}) {
      INFO("trial " << trial << " tau " << tau);
      CHECK(HeadMinimumBudget(random, tau, &scratch) == ReferenceMinimumBudget(random, tau));
    }
  }
}

TEST_CASE("ZigZag budgets from layer uncertainty", "[cpu]") {
  // l_c = 100, r_c = 0.5: B_avg = 50, B_min = 10, uncertainties .1 .2 .3 .4:
  // budget = 10 + 40 * 4 * u = 26, 42, 58, 74 (sum 200 = 4 * 50).
  const std::vector<double> lmba = {10, 20, 30, 40};
  CheckRatios(ZigZagContextRatios(0.5, 100, lmba, 0.2), {0.26, 0.42, 0.58, 0.74});
  // min_fraction 1: uniform.
  CheckRatios(ZigZagContextRatios(0.5, 100, lmba, 1.0), {0.5, 0.5, 0.5, 0.5});
  // min_fraction 0: proportional to LMBA.
  CheckRatios(ZigZagContextRatios(0.5, 100, lmba, 0.0), {0.2, 0.4, 0.6, 0.8});
  // All LMBA zero: uniform. No context: all ones.
  CheckRatios(ZigZagContextRatios(0.3, 100, std::vector<double>{0, 0}, 0.2), {0.3, 0.3});
  CheckRatios(ZigZagContextRatios(0.3, 0, lmba, 0.2), {1, 1, 1, 1});
}

TEST_CASE("ZigZag re-balances what clamping at l_c loses", "[cpu]") {
  // r_c = 0.8: B_avg = 80, B_min = 16; raw budgets 41.6, 67.2, 92.8, 118.4. The last clamps to
  // 100; its 18.4 excess goes to the others in proportion to their headroom 58.4, 32.8, 7.2.
  const std::vector<double> lmba = {10, 20, 30, 40};
  const std::vector<double> ratios = ZigZagContextRatios(0.8, 100, lmba, 0.2);
  const double share = 18.4 / 98.4;
  CheckRatios(ratios, {(41.6 + 58.4 * share) / 100, (67.2 + 32.8 * share) / 100,
                       (92.8 + 7.2 * share) / 100, 1.0});
  CHECK(Mean(ratios) == Approx(0.8).margin(1e-12));

  // A single dominant layer: several clamps at once.
  const std::vector<double> skewed = {1000, 1, 1, 1, 1};
  for (double rc : {0.1, 0.5, 0.9, 1.0}) {
    const std::vector<double> r = ZigZagContextRatios(rc, 1000, skewed, 0.2);
    INFO("r_c " << rc);
    CHECK(Mean(r) == Approx(rc).margin(1e-12));
    for (double v : r) CHECK(v <= 1.0);
  }
}

TEST_CASE("schedule dispatch", "[cpu]") {
  PolicyConfig policy;
  policy.schedule = BudgetSchedule::kFull;
  CheckRatios(LayerContextRatios(policy, 3, 0.2, 50, {}), {1, 1, 1});
  policy.schedule = BudgetSchedule::kUniform;
  CheckRatios(LayerContextRatios(policy, 3, 0.2, 50, {}), {0.2, 0.2, 0.2});
  policy.schedule = BudgetSchedule::kPyramid;
  policy.beta = 0.05;
  CheckRatios(LayerContextRatios(policy, 2, 0.3, 50, {}), {0.55, 0.05});
  policy.schedule = BudgetSchedule::kZigZag;
  policy.zigzag_min_fraction = 0.0;
  const std::vector<double> lmba = {1, 3};
  CheckRatios(LayerContextRatios(policy, 2, 0.4, 50, lmba), {0.2, 0.6});
}

}  // namespace
}  // namespace cachemgr::compress
