// H2O (Zhang et al., 2023): heavy hitters by attention accumulated over every provided query
// (no normalization, no pooling) plus a recent window, uniform across layers. H2O was written
// for multi-head attention; on GQA models its scores are averaged over each KV head's query
// heads so that it stores KV heads, as the model does.
#include "cachemgr/compress/policies/policies.h"

namespace cachemgr::compress {

PolicyConfig H2oPreset() {
  PolicyConfig policy;
  policy.name = "h2o";
  policy.schedule = BudgetSchedule::kUniform;
  policy.scoring = Scoring::kAccumulated;
  policy.window = 32;
  policy.normalization = WindowNormalization::kSum;
  policy.pooling = Pooling::kNone;
  policy.gqa = GqaMode::kGroupMean;
  policy.codebook = false;
  return policy;
}

}  // namespace cachemgr::compress
