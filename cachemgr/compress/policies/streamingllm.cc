// StreamingLLM (Xiao et al., 2023): the first `sinks` tokens (attention sinks) plus the most
// recent ones; the same tokens in every layer and head. The observation window (32) is the
// part of the recent span that is always kept; the rest of the budget extends it backwards.
#include "cachemgr/compress/policies/policies.h"

namespace cachemgr::compress {

PolicyConfig StreamingLlmPreset() {
  PolicyConfig policy;
  policy.name = "streamingllm";
  policy.schedule = BudgetSchedule::kUniform;
  policy.scoring = Scoring::kSinksRecent;
  policy.window = 32;
  policy.sinks = 4;
  policy.pooling = Pooling::kNone;
  policy.gqa = GqaMode::kGroupMean;
  policy.codebook = false;
  return policy;
}

}  // namespace cachemgr::compress
