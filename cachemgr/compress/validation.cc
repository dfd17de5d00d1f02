#include "cachemgr/compress/validation.h"

#include "absl/strings/str_cat.h"
#include "cachemgr/compress/rope.h"

namespace cachemgr::compress {

absl::Status ValidateShape(const ModelShape& shape) {
  if (shape.num_layers == 0) return absl::InvalidArgumentError("shape.num_layers must be > 0");
  if (shape.num_q_heads == 0) return absl::InvalidArgumentError("shape.num_q_heads must be > 0");
  if (shape.num_kv_heads == 0) {
    return absl::InvalidArgumentError("shape.num_kv_heads must be > 0");
  }
  if (shape.num_q_heads % shape.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape.num_q_heads must be a multiple of shape.num_kv_heads (got ",
                     shape.num_q_heads, " and ", shape.num_kv_heads, ")"));
  }
  if (shape.elem_bytes != 1 && shape.elem_bytes != 2 && shape.elem_bytes != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape.elem_bytes must be 1, 2 or 4 (got ", shape.elem_bytes, ")"));
  }
  return ValidateRope(RopeParamsFromShape(shape));
}

absl::Status ValidateTarget(const CompressTarget& target) {
  if (target.kind != TargetKind::kReserveRatio && target.kind != TargetKind::kByteRatio) {
    return absl::InvalidArgumentError(
        absl::StrCat("target.kind is not a known kind (got ", static_cast<int>(target.kind), ")"));
  }
  if (!(target.value > 0.0 && target.value <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("target.value must be in (0, 1] (got ", target.value, ")"));
  }
  return absl::OkStatus();
}

bool PolicyNeedsScores(const PolicyConfig& policy) {
  return policy.schedule != BudgetSchedule::kFull && policy.scoring != Scoring::kSinksRecent;
}

absl::Status ValidateInput(const ModelShape& shape, const PolicyConfig& policy,
                           const SequenceInput& input) {
  if (input.num_tokens == 0) return absl::InvalidArgumentError("input.num_tokens must be > 0");
  if (input.layers.size() != shape.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("input.layers has ", input.layers.size(),
                                                   " entries, shape.num_layers is ",
                                                   shape.num_layers));
  }
  if (!input.positions.empty() && input.positions.size() != input.num_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("input.positions has ", input.positions.size(),
                     " entries, expected input.num_tokens = ", input.num_tokens, " (or none)"));
  }
  const bool needs_scores = PolicyNeedsScores(policy);
  for (size_t l = 0; l < input.layers.size(); ++l) {
    const LayerInput& layer = input.layers[l];
    // Keys score tokens from queries (precomputed scores replace them) and build codebooks.
    const bool keys_read = policy.codebook || (needs_scores && layer.queries != nullptr);
    if (keys_read && layer.keys == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("input.layers[", l, "].keys is null"));
    }
    if (policy.codebook && layer.values == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("input.layers[", l, "].values is null"));
    }
    if (layer.queries != nullptr &&
        (layer.num_queries == 0 || layer.num_queries > input.num_tokens)) {
      return absl::InvalidArgumentError(
          absl::StrCat("input.layers[", l, "].num_queries must be in [1, ", input.num_tokens,
                       "] (got ", layer.num_queries, ")"));
    }
    if (needs_scores && layer.queries == nullptr && layer.scores == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("input.layers[", l, "].queries or .scores is required by policy \"",
                       policy.name, "\" (it scores tokens by attention)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace cachemgr::compress
