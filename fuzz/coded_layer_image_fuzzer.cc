// Fuzzes what a peer daemon sends for a codebook layer (docs/MULTINODE.md): the input, parsed as
// a cachemgr.v1.CodedLayerImage, is decoded for a bf16 model of 2 KV heads x 16
// (CodedLayerImageFromProto) and rebuilt (compress::CodedLayer::FromImage), as the receiver
// does. Oracles besides the sanitizers: a layer that rebuilds holds exactly the message's
// payload bytes, encodes back to a message with the same digest that rebuilds the same layer,
// reconstructs rows of its shape, and takes an appended row or refuses it cleanly.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachemgr/compress/coded_layer.h"
#include "cachemgr/service/coded_layer_wire.h"
#include "fuzz/fuzz_util.h"

namespace cachemgr::fuzz {
namespace {

constexpr uint32_t kHeads = 2, kDim = 16;

compress::ModelShape Shape() {
  compress::ModelShape shape;
  shape.num_layers = 1;
  shape.num_q_heads = 4;
  shape.num_kv_heads = kHeads;
  shape.head_dim = kDim;
  shape.elem_bytes = 2;
  shape.stored_float = compress::StoredFloat::kBf16;
  return shape;
}

void FuzzOne(const uint8_t* data, size_t size) {
  v1::CodedLayerImage proto;
  if (!proto.ParseFromArray(data, static_cast<int>(size))) return;
  absl::StatusOr<compress::CodedLayerImage> image =
      CodedLayerImageFromProto(proto, kHeads, kDim, DType::kBf16);
  if (!image.ok()) {
    Check(image.status().code() == absl::StatusCode::kInvalidArgument &&
              !image.status().message().empty(),
          "a bad message without INVALID_ARGUMENT and a message");
    return;
  }
  absl::StatusOr<compress::CodedLayer> layer =
      compress::CodedLayer::FromImage(Shape(), *std::move(image));
  if (!layer.ok()) {
    Check(layer.status().code() == absl::StatusCode::kInvalidArgument,
          absl::StrCat("FromImage failed with ", layer.status().ToString()));
    return;
  }
  Check(layer->bytes() == CodedLayerPayloadBytes(proto),
        absl::StrCat("a rebuilt layer holds ", layer->bytes(), " bytes for a payload of ",
                     CodedLayerPayloadBytes(proto)));
  v1::CodedLayerImage again;
  Check(CodedLayerImageToProto(layer->ToImage(), proto.layer(), kHeads, kDim, DType::kBf16, &again)
            .ok(),
        "a rebuilt layer does not encode");
  Check(CodedLayerDigest(again) == CodedLayerDigest(proto),
        "a rebuilt layer encodes to another message");
  std::vector<float> keys, values;
  layer->Reconstruct(&keys, &values);
  Check(keys.size() == size_t{layer->rows()} * kHeads * kDim && values.size() == keys.size(),
        "reconstruction of the wrong size");
  std::vector<float> row(kHeads * kDim, 0.25f);
  absl::StatusOr<compress::AppendStats> appended = layer->Append(row, row, {layer->rows()});
  Check(appended.ok() || !appended.status().message().empty(), "an append failed silently");
}

}  // namespace
}  // namespace cachemgr::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cachemgr::fuzz::FuzzOne(data, size);
  return 0;
}
