// The wire form of a codebook layer (proto CodedLayerImage) for transfers between daemons
// (docs/MULTINODE.md): compress::CodedLayerImage packed into the honest bytes the layer holds
// (entries, queued vectors and magnitudes in the pool's dtype, entry indices in
// CodebookRefBytes each), so that a transfer's payload equals CodedLayer::bytes().
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "cachemgr/compress/coded_layer.h"
#include "cachemgr/model_spec.h"
#include "cachemgr/v1/cachemgr.pb.h"

namespace cachemgr {

// `image` of a model with `num_kv_heads` heads of `head_dim` stored as `dtype` (its values are
// stored exactly: CodedLayer rounds them). INTERNAL when the image breaks CodedLayerImage's
// contract (a queue out of order), which a CodedLayer never does.
absl::Status CodedLayerImageToProto(const compress::CodedLayerImage& image, uint32_t layer,
                                    uint32_t num_kv_heads, uint32_t head_dim, DType dtype,
                                    v1::CodedLayerImage* proto);

// The inverse; INVALID_ARGUMENT naming the field whose sizes do not add up. What the image
// means is checked by compress::CodedLayer::FromImage.
absl::StatusOr<compress::CodedLayerImage> CodedLayerImageFromProto(const v1::CodedLayerImage& proto,
                                                                   uint32_t num_kv_heads,
                                                                   uint32_t head_dim, DType dtype);

// Bytes of entries, queued vectors, refs and magnitudes: the layer's honest bytes.
uint64_t CodedLayerPayloadBytes(const v1::CodedLayerImage& proto);

// XXH3-64 of everything the image says (positions, counts, theta, bytes), the same for the same
// layer on both sides of a transfer.
uint64_t CodedLayerDigest(const v1::CodedLayerImage& proto);

}  // namespace cachemgr
