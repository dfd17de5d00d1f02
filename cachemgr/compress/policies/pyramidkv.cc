// PyramidKV (Cai et al., 2024): SnapKV's selection (window 32, plain sum, avg pool 5, per query
// head after repeating KV) with per-layer budgets decreasing linearly from the first layer to
// the last: the corrected eq. 5-6 pyramid with beta = 0.05. No codebook.
#include "cachemgr/compress/policies/policies.h"

namespace cachemgr::compress {

PolicyConfig PyramidKvPreset() {
  PolicyConfig policy = SnapKvPreset();
  policy.name = "pyramidkv";
  policy.schedule = BudgetSchedule::kPyramid;
  policy.beta = 0.05;
  return policy;
}

}  // namespace cachemgr::compress
