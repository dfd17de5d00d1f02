// PyramidInfer-style (Yang et al., 2024), as the SpindleKV paper describes it: eq. 3, i.e. the
// eq. 2 window score as printed (divided by l - a, no pooling) averaged over the query heads of
// each KV head, one selection per KV head; pyramid budgets (beta = 0.05); no codebook.
#include "cachemgr/compress/policies/policies.h"

namespace cachemgr::compress {

PolicyConfig PyramidInferPreset() {
  PolicyConfig policy;
  policy.name = "pyramidinfer";
  policy.schedule = BudgetSchedule::kPyramid;
  policy.beta = 0.05;
  policy.scoring = Scoring::kWindow;
  policy.window = 32;
  policy.normalization = WindowNormalization::kLiteral;
  policy.pooling = Pooling::kNone;
  policy.gqa = GqaMode::kGroupMean;
  policy.codebook = false;
  return policy;
}

}  // namespace cachemgr::compress
