#include "cachemgr/model_spec.h"

#include <catch2/catch.hpp>
#include <string>

namespace cachemgr {
namespace {

ModelSpec Spec() {
  ModelSpec m;
  m.name = "llama";
  m.num_layers = 32;
  m.num_q_heads = 32;
  m.num_kv_heads = 8;
  m.head_dim = 128;
  m.dtype = DType::kBf16;
  m.block_size = 16;
  return m;
}

ModelSpec MaxSpec() {
  ModelSpec m = Spec();
  m.num_layers = kMaxLayers;
  m.num_q_heads = kMaxHeads;
  m.num_kv_heads = kMaxHeads;
  m.head_dim = kMaxHeadDim;
  m.dtype = DType::kFp32;
  m.block_size = kMaxBlockSize;
  return m;
}

TEST_CASE("every field at its maximum is valid and its block size fits", "[cpu]") {
  const ModelSpec m = MaxSpec();
  REQUIRE(ValidateModelSpec(m).ok());
  CHECK(m.BlockBytes() == uint64_t{2} * 1024 * 4096 * 1024 * 4);  // 2^35
  // 2^35 * (2^29 - 1) fits; 2^35 * 2^29 = 2^64 does not.
  const uint32_t below = (uint32_t{1} << 29) - 1;
  auto fits = m.LayerBytes(below);
  REQUIRE(fits.ok());
  CHECK(*fits == (uint64_t{1} << 35) * below);
  auto over = m.LayerBytes(uint32_t{1} << 29);
  REQUIRE(over.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(over.status().message()), Catch::StartsWith("num_blocks 536870912"));
  CHECK(m.LayerBytes(UINT32_MAX).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("the issue's layer size fits 64 bits; its 290 layers do not", "[cpu]") {
  ModelSpec m = Spec();
  m.num_layers = 290;
  m.num_q_heads = 4013;
  m.num_kv_heads = 4013;
  m.head_dim = 1018;
  m.dtype = DType::kFp32;
  m.block_size = 1013;
  m.rope.style = RopeStyle::kNone;
  REQUIRE(ValidateModelSpec(m).ok());
  auto layer = m.LayerBytes(1921345);
  REQUIRE(layer.ok());
  CHECK(*layer == uint64_t{1921345} * 2 * 1013 * 4013 * 1018 * 4);  // ~6.4e16
}

TEST_CASE("a name too long is refused with a short message", "[cpu]") {
  ModelSpec m = Spec();
  m.name = std::string(4 << 20, 'n');
  const absl::Status s = ValidateModelSpec(m);
  REQUIRE(s.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(s.message()), Catch::StartsWith("model.name must be 1-128"));
  CHECK(s.message().size() < 256);
  CHECK_THAT(std::string(s.message()), Catch::Contains("(4194304 bytes)"));
}

TEST_CASE("Describe includes RoPE, so different RoPE describes differently", "[cpu]") {
  ModelSpec a = Spec(), b = Spec();
  b.rope.theta = 500000;
  CHECK(a.Describe() == "llama L=32 H=32/8 D=128 bf16 bs=16 flash_attn rope=interleaved/10000/1/0");
  CHECK(a.Describe() != b.Describe());
  b.rope.style = RopeStyle::kNone;
  CHECK_THAT(b.Describe(), Catch::EndsWith("rope=none"));
}

TEST_CASE("DifferingFields names the fields, in declaration order", "[cpu]") {
  ModelSpec a = Spec(), b = Spec();
  CHECK(a.DifferingFields(b).empty());
  b.num_kv_heads = 4;
  b.rope.theta = 1e6;
  b.rope.rotary_dim = 64;
  CHECK(a.DifferingFields(b) ==
        std::vector<std::string>{"num_kv_heads", "rope.theta", "rope.rotary_dim"});
}

}  // namespace
}  // namespace cachemgr
