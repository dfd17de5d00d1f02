// Argument checks of CompressSequence / MaterializeLayer, one per argument. Each returns
// INVALID_ARGUMENT whose message starts with the offending field ("shape.head_dim ...",
// "input.layers[3].keys ...", "target.value ..."). ValidatePolicy lives in presets.cc.
#pragma once

#include "absl/status/status.h"
#include "cachemgr/compress/compress.h"

namespace cachemgr::compress {

// Counts > 0, num_q_heads a multiple of num_kv_heads, elem_bytes in {1, 2, 4}, RoPE fields
// (ValidateRope).
absl::Status ValidateShape(const ModelShape& shape);

// kind known, value in (0, 1].
absl::Status ValidateTarget(const CompressTarget& target);

// One LayerInput per layer; num_tokens > 0; positions empty or num_tokens long; when the policy
// scores tokens (schedule not kFull and scoring not kSinksRecent) every layer has queries
// (num_queries in [1, num_tokens]) or scores. Keys are required where they are read (a codebook
// policy, or scoring from queries), values for a codebook policy.
// REQUIRES: shape and policy valid.
absl::Status ValidateInput(const ModelShape& shape, const PolicyConfig& policy,
                           const SequenceInput& input);

// True when the policy needs queries or precomputed scores.
bool PolicyNeedsScores(const PolicyConfig& policy);

}  // namespace cachemgr::compress
