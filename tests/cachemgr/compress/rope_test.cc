#include "cachemgr/compress/rope.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <vector>

namespace cachemgr::compress {
namespace {

RopeParams Params(RopeStyle style, uint32_t head_dim, uint32_t rotary_dim = 0,
                  double theta = 10000.0, double scaling = 1.0) {
  RopeParams params;
  params.style = style;
  params.head_dim = head_dim;
  params.rotary_dim = rotary_dim;
  params.theta = theta;
  params.scaling = scaling;
  return params;
}

TEST_CASE("one pair rotates by position * inv_freq[0] = position", "[cpu]") {
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalfSplit}) {
    std::vector<float> x = {1.0f, 0.0f};
    const std::vector<uint32_t> positions = {1};
    REQUIRE(ApplyRope(Params(style, 2), positions, 1, absl::MakeSpan(x)).ok());
    CHECK(x[0] == Approx(std::cos(1.0)));
    CHECK(x[1] == Approx(std::sin(1.0)));

    // Linear scaling: position 3 / scaling 2 = angle 1.5. (a, b) = (0.6, -0.8).
    std::vector<float> y = {0.6f, -0.8f};
    const std::vector<uint32_t> three = {3};
    REQUIRE(ApplyRope(Params(style, 2, 0, 10000.0, 2.0), three, 1, absl::MakeSpan(y)).ok());
    CHECK(y[0] == Approx(0.6 * std::cos(1.5) + 0.8 * std::sin(1.5)));
    CHECK(y[1] == Approx(0.6 * std::sin(1.5) - 0.8 * std::cos(1.5)));
  }
}

// Rotation of (a, b) by angle.
std::pair<double, double> Rotated(double a, double b, double angle) {
  return {a * std::cos(angle) - b * std::sin(angle), a * std::sin(angle) + b * std::cos(angle)};
}

TEST_CASE("head_dim 4: pair layout and inv_freq = theta^(-2i/d)", "[cpu]") {
  // theta 10000, d = 4: inv_freq = {1, 0.01}; position 2: angles {2, 0.02}.
  const std::vector<uint32_t> positions = {2};
  std::vector<float> interleaved = {1, 2, 3, 4};
  REQUIRE(ApplyRope(Params(RopeStyle::kInterleaved, 4), positions, 1, absl::MakeSpan(interleaved))
              .ok());
  auto [i0, i1] = Rotated(1, 2, 2.0);
  auto [i2, i3] = Rotated(3, 4, 0.02);
  CHECK(interleaved[0] == Approx(i0));
  CHECK(interleaved[1] == Approx(i1));
  CHECK(interleaved[2] == Approx(i2));
  CHECK(interleaved[3] == Approx(i3));

  std::vector<float> half = {1, 2, 3, 4};
  REQUIRE(ApplyRope(Params(RopeStyle::kHalfSplit, 4), positions, 1, absl::MakeSpan(half)).ok());
  auto [h0, h2] = Rotated(1, 3, 2.0);
  auto [h1, h3] = Rotated(2, 4, 0.02);
  CHECK(half[0] == Approx(h0));
  CHECK(half[1] == Approx(h1));
  CHECK(half[2] == Approx(h2));
  CHECK(half[3] == Approx(h3));
  // The two styles differ on the same input.
  CHECK(std::abs(half[1] - interleaved[1]) > 0.1);
}

TEST_CASE("partial rotary_dim rotates only the leading dims", "[cpu]") {
  // head_dim 6, rotary_dim 4: inv_freq = {1, 0.01} over R = 4; dims 4, 5 pass through.
  const std::vector<uint32_t> positions = {5};
  std::vector<float> x = {1, 2, 3, 4, 5, 6};
  REQUIRE(ApplyRope(Params(RopeStyle::kHalfSplit, 6, 4), positions, 1, absl::MakeSpan(x)).ok());
  auto [a0, a2] = Rotated(1, 3, 5.0);
  auto [a1, a3] = Rotated(2, 4, 0.05);
  CHECK(x[0] == Approx(a0));
  CHECK(x[1] == Approx(a1));
  CHECK(x[2] == Approx(a2));
  CHECK(x[3] == Approx(a3));
  CHECK(x[4] == 5.0f);
  CHECK(x[5] == 6.0f);
}

TEST_CASE("unapply(apply(x)) == x, norms preserved, both styles", "[cpu]") {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  const std::vector<uint32_t> positions = {0, 7, 100, 4095, 30000};
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalfSplit}) {
    for (uint32_t rotary_dim : {0u, 4u, 16u}) {
      for (double scaling : {1.0, 4.0}) {
        const RopeParams params = Params(style, 16, rotary_dim, 500000.0, scaling);
        const uint32_t heads = 3;
        std::vector<float> x(positions.size() * heads * 16);
        for (float& v : x) v = normal(rng);
        std::vector<float> y = x;
        REQUIRE(ApplyRope(params, positions, heads, absl::MakeSpan(y)).ok());
        if (rotary_dim != 0) {  // untouched tail
          CHECK(y[16 + 15] == x[16 + 15]);
        }
        for (size_t v = 0; v < x.size(); v += 16) {
          double before = 0, after = 0;
          for (size_t i = 0; i < 16; ++i) {
            before += x[v + i] * x[v + i];
            after += y[v + i] * y[v + i];
          }
          CHECK(after == Approx(before).epsilon(1e-5));
        }
        REQUIRE(UnapplyRope(params, positions, heads, absl::MakeSpan(y)).ok());
        for (size_t i = 0; i < x.size(); ++i) CHECK(y[i] == Approx(x[i]).margin(1e-5));
      }
    }
  }
}

TEST_CASE("RotateRows with a shared angle table matches ApplyRope", "[cpu]") {
  const RopeParams params = Params(RopeStyle::kInterleaved, 8);
  const std::vector<uint32_t> token_positions = {10, 11, 12, 13};
  const RopeAngles angles = ComputeRopeAngles(params, token_positions);
  CHECK(angles.num_pairs == 4);
  // Rows gathered out of order: tokens 3, 0, 3.
  const std::vector<uint32_t> rows = {3, 0, 3};
  std::vector<float> x(3 * 8);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 5) - 2.0f;
  std::vector<float> expected = x;
  const std::vector<uint32_t> positions = {13, 10, 13};
  REQUIRE(ApplyRope(params, positions, 1, absl::MakeSpan(expected)).ok());
  RotateRows(params, angles, rows, 1, absl::MakeSpan(x), /*inverse=*/false);
  for (size_t i = 0; i < x.size(); ++i) CHECK(x[i] == Approx(expected[i]).margin(1e-6));
}

TEST_CASE("kNone is a no-op", "[cpu]") {
  std::vector<float> x = {1, 2, 3, 4};
  const std::vector<uint32_t> positions = {9};
  REQUIRE(ApplyRope(Params(RopeStyle::kNone, 4), positions, 1, absl::MakeSpan(x)).ok());
  CHECK(x == std::vector<float>{1, 2, 3, 4});
}

TEST_CASE("invalid RoPE parameters name the field", "[cpu]") {
  std::vector<float> x(4);
  const std::vector<uint32_t> positions = {1};
  auto message = [&](const RopeParams& params) {
    const absl::Status status = ApplyRope(params, positions, 1, absl::MakeSpan(x));
    CHECK(status.code() == absl::StatusCode::kInvalidArgument);
    return std::string(status.message());
  };
  CHECK(message(Params(RopeStyle::kInterleaved, 4, 3)).rfind("shape.rotary_dim", 0) == 0);
  CHECK(message(Params(RopeStyle::kInterleaved, 4, 6)).rfind("shape.rotary_dim", 0) == 0);
  CHECK(message(Params(RopeStyle::kInterleaved, 4, 0, 0.0)).rfind("shape.rope_theta", 0) == 0);
  CHECK(message(Params(RopeStyle::kInterleaved, 4, 0, 1e4, -1.0)).rfind("shape.rope_scaling", 0) ==
        0);
  CHECK(message(Params(RopeStyle::kInterleaved, 0)).rfind("shape.head_dim", 0) == 0);
  CHECK(!ApplyRope(Params(RopeStyle::kInterleaved, 2), positions, 1, absl::MakeSpan(x)).ok());
}

}  // namespace
}  // namespace cachemgr::compress
