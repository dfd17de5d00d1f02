// The codebook stage of one layer (paper §3.4): the kept K and V vectors of a selected layer
// replaced by codebooks (entries + per-vector ref and magnitude), built by BuildCodebook.
//
// Keys are un-rotated to pre-RoPE at their token's position before the build (the paper
// builds on pre-RoPE K); MaterializeLayer re-rotates them. Vectors are ordered [kv head][kept
// token].
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "cachemgr/compress/codebook.h"
#include "cachemgr/compress/compress.h"
#include "cachemgr/compress/rope.h"

namespace cachemgr::compress {

// Fills result->key_codebook / value_codebook and the part offsets for the selection already in
// `result` (kept, kept_per_head). Scope kLayer builds one codebook per layer over all KV heads;
// kKvHead one per KV head, concatenated. With policy.codebook_only_if_smaller the codebooks are
// dropped again when their honest bytes are not below the plain bytes of the same selection.
// `angles` holds the RoPE angles of every token of the sequence, indexed by token; `graph`
// builds the similarity graphs (null: on the host); `scratch` is this thread's reusable memory
// (CodebookOptions::scratch; null: none). Errors from BuildCodebook pass through.
absl::Status BuildLayerCodebooks(const ModelShape& shape, const PolicyConfig& policy,
                                 const LayerInput& layer, const RopeParams& rope,
                                 const RopeAngles& angles, const SimilarityGraphBuilder* graph,
                                 CodebookScratch* scratch, LayerResult* result);

}  // namespace cachemgr::compress
