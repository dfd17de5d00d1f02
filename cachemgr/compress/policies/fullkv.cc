// FullKV: the uncompressed baseline. Nothing is scored or evicted; no codebook.
#include "cachemgr/compress/policies/policies.h"

namespace cachemgr::compress {

PolicyConfig FullKvPreset() {
  PolicyConfig policy;
  policy.name = "fullkv";
  policy.schedule = BudgetSchedule::kFull;
  policy.scoring = Scoring::kSinksRecent;  // needs no queries or scores
  policy.pooling = Pooling::kNone;
  policy.gqa = GqaMode::kGroupMean;
  policy.codebook = false;
  return policy;
}

}  // namespace cachemgr::compress
