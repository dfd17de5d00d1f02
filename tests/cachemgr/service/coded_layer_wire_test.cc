// The wire form of a coded layer: what travels is the layer's honest bytes (plus a bitmap,
// counts and positions), it decodes to the same layer, and a message whose sizes do not add up
// is refused naming the field.
#include "cachemgr/service/coded_layer_wire.h"

#include <catch2/catch.hpp>
#include <functional>
#include <random>
#include <vector>

#include "absl/strings/match.h"
#include "tests/cachemgr/compress/test_sequence.h"

namespace cachemgr {
namespace {

using compress::CodedLayer;
using compress::StoredFloat;

StoredFloat StoredFor(DType dtype) {
  return dtype == DType::kBf16   ? StoredFloat::kBf16
         : dtype == DType::kFp16 ? StoredFloat::kFp16
                                 : StoredFloat::kFloat32;
}

// A layer of coded and queued rows for `dtype` (2 KV heads of 16).
CodedLayer MakeLayer(DType dtype, compress::CodebookScope scope) {
  compress::ModelShape shape = compress::Shape(1, 2, 2, 16);
  shape.elem_bytes = DTypeBytes(dtype);
  shape.stored_float = StoredFor(dtype);
  const compress::Sequence s = compress::MakeSequence(shape, 64, 8, 32, /*clusters=*/3);
  compress::PolicyConfig policy = *compress::PresetPolicy("spindlekv");
  policy.window = 8;
  policy.codebook_scope = scope;
  policy.codebook_only_if_smaller = false;
  policy.append_batch = 100;
  auto result = compress::CompressSequence(shape, policy, s.input,
                                           {compress::TargetKind::kReserveRatio, 0.5});
  REQUIRE(result.ok());
  auto layer = CodedLayer::FromResult(shape, policy, result->layers[0], s.input.positions);
  REQUIRE(layer.ok());
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> rows(3 * 2 * 16);
  for (float& x : rows) x = compress::RoundToStored(normal(rng), shape.stored_float);
  REQUIRE(layer->Append(rows, rows, {64, 65, 66}).ok());
  REQUIRE(layer->queued() > 0);
  return *std::move(layer);
}

TEST_CASE("a coded layer travels in its honest bytes and decodes to the same layer", "[cpu]") {
  const DType dtype = GENERATE(DType::kFp32, DType::kBf16, DType::kFp16);
  const auto scope = GENERATE(compress::CodebookScope::kLayer, compress::CodebookScope::kKvHead);
  const CodedLayer layer = MakeLayer(dtype, scope);
  v1::CodedLayerImage proto;
  REQUIRE(CodedLayerImageToProto(layer.ToImage(), 7, 2, 16, dtype, &proto).ok());
  CHECK(proto.layer() == 7);
  CHECK(CodedLayerPayloadBytes(proto) == layer.bytes());
  // Framing: the queued-row bitmap, counts, positions and theta, small beside the payload.
  CHECK(proto.ByteSizeLong() < layer.bytes() + 2 * layer.rows() * 4 + 256);

  v1::CodedLayerImage parsed;
  REQUIRE(parsed.ParseFromString(proto.SerializeAsString()));
  auto image = CodedLayerImageFromProto(parsed, 2, 16, dtype);
  REQUIRE(image.ok());
  compress::ModelShape shape = compress::Shape(1, 2, 2, 16);
  shape.elem_bytes = DTypeBytes(dtype);
  shape.stored_float = StoredFor(dtype);
  auto rebuilt = CodedLayer::FromImage(shape, *std::move(image));
  REQUIRE(rebuilt.ok());
  std::vector<float> k0, v0, k1, v1;
  layer.Reconstruct(&k0, &v0);
  rebuilt->Reconstruct(&k1, &v1);
  CHECK(k0 == k1);
  CHECK(v0 == v1);
  v1::CodedLayerImage again;
  REQUIRE(CodedLayerImageToProto(rebuilt->ToImage(), 7, 2, 16, dtype, &again).ok());
  CHECK(CodedLayerDigest(again) == CodedLayerDigest(proto));
  // The digest sees a change of any part.
  again.mutable_value()->mutable_magnitudes()->back() ^= 1;
  CHECK(CodedLayerDigest(again) != CodedLayerDigest(proto));
}

TEST_CASE("a coded layer message whose sizes do not add up is refused", "[cpu]") {
  const CodedLayer layer = MakeLayer(DType::kBf16, compress::CodebookScope::kKvHead);
  v1::CodedLayerImage good;
  REQUIRE(CodedLayerImageToProto(layer.ToImage(), 0, 2, 16, DType::kBf16, &good).ok());
  REQUIRE(CodedLayerImageFromProto(good, 2, 16, DType::kBf16).ok());
  auto refused = [&](const std::function<void(v1::CodedLayerImage&)>& spoil, const char* words) {
    v1::CodedLayerImage p = good;
    spoil(p);
    auto r = CodedLayerImageFromProto(p, 2, 16, DType::kBf16);
    INFO(words << ": " << r.status());
    CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(absl::StrContains(r.status().message(), words));
  };
  refused([](v1::CodedLayerImage& p) { p.set_num_parts(5); }, "num_parts");
  refused([](v1::CodedLayerImage& p) { p.add_positions(1); }, "positions");
  refused([](v1::CodedLayerImage& p) { p.mutable_key()->add_part_entries(1); }, "part_entries");
  refused([](v1::CodedLayerImage& p) { p.mutable_key()->mutable_entries()->pop_back(); },
          "entries is shorter");
  refused([](v1::CodedLayerImage& p) { p.mutable_value()->mutable_queued()->append("xx"); },
          "longer than its counts");
  refused([](v1::CodedLayerImage& p) { p.mutable_key()->mutable_queued_rows()->append("x"); },
          "queued_rows");
  refused([](v1::CodedLayerImage& p) { p.mutable_value()->mutable_refs()->append("zz"); },
          "refs is longer");
  refused([](v1::CodedLayerImage& p) { p.mutable_value()->mutable_refs()->resize(1); },
          "refs is too short");
  refused([](v1::CodedLayerImage& p) { p.mutable_key()->mutable_magnitudes()->append("mm"); },
          "magnitudes");
  // Wrong heads or dims for the receiving model.
  CHECK(CodedLayerImageFromProto(good, 3, 16, DType::kBf16).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(CodedLayerImageFromProto(good, 2, 8, DType::kBf16).status().code() ==
        absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace cachemgr
