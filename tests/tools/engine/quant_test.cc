// Dequantization of ggml blocks built by hand, element by element.
#include "tools/engine/quant.h"

#include <catch2/catch.hpp>
#include <cstring>
#include <vector>

#include "cachemgr/kernels/elem_convert.h"

namespace cachemgr::engine {
namespace {

void PutHalf(std::vector<std::byte>& b, size_t at, float v) {
  const uint16_t h = kernels::F32ToF16(v);
  std::memcpy(&b[at], &h, 2);
}

TEST_CASE("block sizes and unsupported types", "[cpu]") {
  uint64_t bytes = 0;
  REQUIRE(GgmlRowBytes(0, 10, &bytes).ok());
  CHECK(bytes == 40);
  REQUIRE(GgmlRowBytes(1, 10, &bytes).ok());
  CHECK(bytes == 20);
  REQUIRE(GgmlRowBytes(2, 64, &bytes).ok());
  CHECK(bytes == 36);
  REQUIRE(GgmlRowBytes(3, 64, &bytes).ok());
  CHECK(bytes == 40);
  REQUIRE(GgmlRowBytes(8, 64, &bytes).ok());
  CHECK(bytes == 68);
  CHECK(GgmlRowBytes(3, 33, &bytes).code() == absl::StatusCode::kInvalidArgument);
  CHECK(GgmlRowBytes(12, 256, &bytes).code() == absl::StatusCode::kUnimplemented);  // q4_K
}

TEST_CASE("q4_0, q4_1 and q8_0 blocks dequantize element by element", "[cpu]") {
  // q4_0: d = 0.5; element j in the low nibble of byte j, element j + 16 in the high nibble.
  std::vector<std::byte> q40(18);
  PutHalf(q40, 0, 0.5f);
  for (int j = 0; j < 16; ++j) q40[2 + j] = static_cast<std::byte>((15 - j) << 4 | j);
  std::vector<float> out(32);
  Dequantize(2, q40.data(), absl::MakeSpan(out));
  for (int j = 0; j < 16; ++j) {
    CHECK(out[j] == 0.5f * (j - 8));
    CHECK(out[j + 16] == 0.5f * ((15 - j) - 8));
  }
  // q4_1: d = 0.25, m = -1.
  std::vector<std::byte> q41(20);
  PutHalf(q41, 0, 0.25f);
  PutHalf(q41, 2, -1.0f);
  for (int j = 0; j < 16; ++j) q41[4 + j] = static_cast<std::byte>(j << 4 | (j / 2));
  Dequantize(3, q41.data(), absl::MakeSpan(out));
  for (int j = 0; j < 16; ++j) {
    CHECK(out[j] == 0.25f * (j / 2) - 1.0f);
    CHECK(out[j + 16] == 0.25f * j - 1.0f);
  }
  // q8_0 over two blocks: d = 2 then d = -0.125.
  std::vector<std::byte> q8(68);
  PutHalf(q8, 0, 2.0f);
  PutHalf(q8, 34, -0.125f);
  for (int j = 0; j < 32; ++j) {
    q8[2 + j] = static_cast<std::byte>(static_cast<int8_t>(j - 16));
    q8[36 + j] = static_cast<std::byte>(static_cast<int8_t>(127 - j));
  }
  std::vector<float> two(64);
  Dequantize(8, q8.data(), absl::MakeSpan(two));
  for (int j = 0; j < 32; ++j) {
    CHECK(two[j] == 2.0f * (j - 16));
    CHECK(two[32 + j] == -0.125f * (127 - j));
  }
}

TEST_CASE("f16, bf16 and f32 rows", "[cpu]") {
  const std::vector<float> want = {1.0f, -2.5f, 0.0f, 65504.0f};
  std::vector<std::byte> f16(8), bf16(8), f32(16);
  for (size_t i = 0; i < want.size(); ++i) {
    PutHalf(f16, 2 * i, want[i]);
    const uint16_t b = kernels::F32ToBf16(want[i]);
    std::memcpy(&bf16[2 * i], &b, 2);
    std::memcpy(&f32[4 * i], &want[i], 4);
  }
  std::vector<float> out(4);
  Dequantize(1, f16.data(), absl::MakeSpan(out));
  CHECK(out == want);
  Dequantize(0, f32.data(), absl::MakeSpan(out));
  CHECK(out == want);
  Dequantize(30, bf16.data(), absl::MakeSpan(out));
  CHECK(out[0] == 1.0f);
  CHECK(out[1] == -2.5f);
  CHECK(out[3] == 65536.0f);  // bf16 has 8 mantissa bits: 65504 rounds up
}

}  // namespace
}  // namespace cachemgr::engine
