// SpindleKV (the paper, Table 3 hyper-parameters): pyramid budgets (corrected eq. 5-6,
// beta = 0.05, alpha = 0.525), window scores (window 32, SnapKV's plain sum with avg pool 5),
// GQA unfolded by repeat (Table 2), then a similarity codebook per layer with theta_K = 0.98,
// theta_V = 0.95 on the kept vectors, kept where it is smaller than the plain layer.
#include "cachemgr/compress/policies/policies.h"

namespace cachemgr::compress {

PolicyConfig SpindleKvPreset() {
  PolicyConfig policy;
  policy.name = "spindlekv";
  policy.schedule = BudgetSchedule::kPyramid;
  policy.beta = 0.05;
  policy.scoring = Scoring::kWindow;
  policy.window = 32;
  policy.normalization = WindowNormalization::kSum;
  policy.pooling = Pooling::kAvg;
  policy.pool_kernel = 5;
  policy.gqa = GqaMode::kRepeat;
  policy.codebook = true;
  policy.theta_k = 0.98f;
  policy.theta_v = 0.95f;
  policy.codebook_scope = CodebookScope::kLayer;
  policy.codebook_only_if_smaller = true;
  return policy;
}

}  // namespace cachemgr::compress
