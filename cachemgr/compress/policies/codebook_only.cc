// Codebook-only (SpindleKV without eviction, paper Table 5): every token kept, each layer's K
// (pre-RoPE) and V replaced by similarity codebooks with theta_K = 0.98, theta_V = 0.95, where
// that is smaller than the plain layer. Stores KV heads (nothing is selected, so nothing is
// repeated).
#include "cachemgr/compress/policies/policies.h"

namespace cachemgr::compress {

PolicyConfig CodebookOnlyPreset() {
  PolicyConfig policy;
  policy.name = "codebook";
  policy.schedule = BudgetSchedule::kFull;
  policy.scoring = Scoring::kSinksRecent;  // needs no queries or scores
  policy.pooling = Pooling::kNone;
  policy.gqa = GqaMode::kGroupMean;
  policy.codebook = true;
  policy.theta_k = 0.98f;
  policy.theta_v = 0.95f;
  policy.codebook_scope = CodebookScope::kLayer;
  policy.codebook_only_if_smaller = true;
  return policy;
}

}  // namespace cachemgr::compress
