// ZigZagKV (Zhong et al., 2024): SnapKV's selection with per-layer budgets from layer
// uncertainty. LMBA_l is the mean over query heads of the fewest context tokens holding
// tau = 0.9 of the head's window attention; budget_l = B_min + (B_avg - B_min) * L *
// LMBA_l / sum(LMBA), B_min = 0.2 * B_avg (budget.h has the clamping and re-balancing).
#include "cachemgr/compress/policies/policies.h"

namespace cachemgr::compress {

PolicyConfig ZigZagKvPreset() {
  PolicyConfig policy = SnapKvPreset();
  policy.name = "zigzagkv";
  policy.schedule = BudgetSchedule::kZigZag;
  policy.zigzag_tau = 0.9;
  policy.zigzag_min_fraction = 0.2;
  return policy;
}

}  // namespace cachemgr::compress
