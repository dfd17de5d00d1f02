// SnapKV (Li et al., 2024), as its public code does it: an observation window of the last 32
// queries, attention summed over the window rows (no divisor), average pooling with kernel 5
// (zero padding counted), the same budget in every layer. Its code repeats the KV heads to the
// query heads before selecting ("[SnapKV] move to ahead" in its Mistral/Llama patches), so it
// selects per query head and stores the repeated vectors: GqaMode::kRepeat.
#include "cachemgr/compress/policies/policies.h"

namespace cachemgr::compress {

PolicyConfig SnapKvPreset() {
  PolicyConfig policy;
  policy.name = "snapkv";
  policy.schedule = BudgetSchedule::kUniform;
  policy.scoring = Scoring::kWindow;
  policy.window = 32;
  policy.normalization = WindowNormalization::kSum;
  policy.pooling = Pooling::kAvg;
  policy.pool_kernel = 5;
  policy.gqa = GqaMode::kRepeat;
  policy.codebook = false;
  return policy;
}

}  // namespace cachemgr::compress
