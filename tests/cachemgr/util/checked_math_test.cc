#include "cachemgr/util/checked_math.h"

#include <catch2/catch.hpp>
#include <cstdint>

namespace cachemgr {
namespace {

constexpr uint64_t kMax = UINT64_MAX;

TEST_CASE("CheckedMul refuses exactly the products that do not fit", "[cpu]") {
  CHECK(CheckedMul<uint64_t>(0, kMax) == 0u);
  CHECK(CheckedMul<uint64_t>(1, kMax) == kMax);
  CHECK(CheckedMul<uint64_t>(uint64_t{1} << 32, (uint64_t{1} << 32) - 1) ==
        (uint64_t{1} << 32) * ((uint64_t{1} << 32) - 1));
  CHECK_FALSE(CheckedMul<uint64_t>(uint64_t{1} << 32, uint64_t{1} << 32).has_value());
  CHECK_FALSE(CheckedMul<uint64_t>(2, (kMax / 2) + 1).has_value());
  CHECK(CheckedMul<uint32_t>(65535, 65537) == 4294967295u);
  CHECK_FALSE(CheckedMul<uint32_t>(65536, 65536).has_value());
}

TEST_CASE("CheckedAdd and CheckedRoundUp stop at 2^64", "[cpu]") {
  CHECK(CheckedAdd<uint64_t>(kMax - 1, 1) == kMax);
  CHECK_FALSE(CheckedAdd<uint64_t>(kMax, 1).has_value());
  CHECK(CheckedRoundUp(0, 4096) == 0u);
  CHECK(CheckedRoundUp(1, 4096) == 4096u);
  CHECK(CheckedRoundUp(4096, 4096) == 4096u);
  CHECK(CheckedRoundUp(kMax - 4095, 4096) == kMax - 4095);  // 2^64 - 4096: a multiple
  CHECK(CheckedRoundUp(kMax - 4096, 4096) == kMax - 4095);
  CHECK_FALSE(CheckedRoundUp(kMax - 4094, 4096).has_value());  // would be 2^64
}

TEST_CASE("CheckedProduct: just below and just above 2^64", "[cpu]") {
  CHECK(CheckedProduct({}) == 1u);
  // (2^32 - 1) * (2^32 + 1) = 2^64 - 1: the largest product that fits.
  CHECK(CheckedProduct({(uint64_t{1} << 32) - 1, (uint64_t{1} << 32) + 1}) == kMax);
  // 2^32 * (2^32 + 1) = 2^64 + 2^32: just above.
  CHECK_FALSE(CheckedProduct({uint64_t{1} << 32, (uint64_t{1} << 32) + 1}).has_value());
  // The pool: 290 layers of 1921345 blocks of 2 * 1013 * 4013 * 1018 * 4 bytes wraps
  // to a 683 MB region when computed unchecked.
  const uint64_t layer = uint64_t{1921345} * 2 * 1013 * 4013 * 1018 * 4;
  CHECK(CheckedProduct({1921345, 2, 1013, 4013, 1018, 4}) == layer);
  CHECK_FALSE(CheckedProduct({290, 1921345, 2, 1013, 4013, 1018, 4}).has_value());
  // A product that overflows on the way is refused even if a later factor is 0: sizes are
  // refused conservatively.
  CHECK_FALSE(CheckedProduct({uint64_t{1} << 63, 2, 0}).has_value());
}

TEST_CASE("saturating arithmetic clamps at the largest value", "[cpu]") {
  CHECK(SaturatingMul<uint64_t>(uint64_t{1} << 40, uint64_t{1} << 40) == kMax);
  CHECK(SaturatingMul<uint64_t>(3, 5) == 15u);
  CHECK(SaturatingAdd<uint64_t>(kMax, kMax) == kMax);
  CHECK(SaturatingAdd<uint64_t>(2, 5) == 7u);
}

}  // namespace
}  // namespace cachemgr
