// The preset registry and policy validation (PresetPolicy, PresetNames, ValidatePolicy of
// compress.h).
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cachemgr/compress/compress.h"
#include "cachemgr/compress/policies/policies.h"

namespace cachemgr::compress {
namespace {

using PresetFactory = PolicyConfig (*)();

const std::vector<std::pair<std::string, PresetFactory>>& Presets() {
  static const auto* presets = new std::vector<std::pair<std::string, PresetFactory>>{
      {"fullkv", &FullKvPreset},
      {"streamingllm", &StreamingLlmPreset},
      {"h2o", &H2oPreset},
      {"snapkv", &SnapKvPreset},
      {"pyramidkv", &PyramidKvPreset},
      {"pyramidinfer", &PyramidInferPreset},
      {"zigzagkv", &ZigZagKvPreset},
      {"codebook", &CodebookOnlyPreset},
      {"spindlekv", &SpindleKvPreset},
  };
  return *presets;
}

absl::Status OutOfRange(const char* field, const char* range, double got) {
  return absl::InvalidArgumentError(
      absl::StrCat("policy.", field, " must be in ", range, " (got ", got, ")"));
}

}  // namespace

absl::StatusOr<PolicyConfig> PresetPolicy(const std::string& name) {
  for (const auto& [preset_name, factory] : Presets()) {
    if (preset_name == name) return factory();
  }
  return absl::NotFoundError(
      absl::StrCat("unknown policy \"", name, "\"; known: ", absl::StrJoin(PresetNames(), ", ")));
}

std::vector<std::string> PresetNames() {
  std::vector<std::string> names;
  for (const auto& [name, factory] : Presets()) names.push_back(name);
  return names;
}

absl::Status ValidatePolicy(const PolicyConfig& policy) {
  if (static_cast<int>(policy.schedule) > static_cast<int>(BudgetSchedule::kZigZag)) {
    return absl::InvalidArgumentError(absl::StrCat("policy.schedule is not a known schedule (got ",
                                                   static_cast<int>(policy.schedule), ")"));
  }
  if (static_cast<int>(policy.scoring) > static_cast<int>(Scoring::kSinksRecent)) {
    return absl::InvalidArgumentError(absl::StrCat("policy.scoring is not a known scoring (got ",
                                                   static_cast<int>(policy.scoring), ")"));
  }
  if (static_cast<int>(policy.normalization) > static_cast<int>(WindowNormalization::kSum)) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.normalization is not a known normalization (got ",
                     static_cast<int>(policy.normalization), ")"));
  }
  if (static_cast<int>(policy.pooling) > static_cast<int>(Pooling::kMax)) {
    return absl::InvalidArgumentError(absl::StrCat("policy.pooling is not a known pooling (got ",
                                                   static_cast<int>(policy.pooling), ")"));
  }
  if (static_cast<int>(policy.gqa) > static_cast<int>(GqaMode::kRepeat)) {
    return absl::InvalidArgumentError(absl::StrCat("policy.gqa is not a known GQA mode (got ",
                                                   static_cast<int>(policy.gqa), ")"));
  }
  if (static_cast<int>(policy.codebook_scope) > static_cast<int>(CodebookScope::kKvHead)) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.codebook_scope is not a known scope (got ",
                     static_cast<int>(policy.codebook_scope), ")"));
  }
  if (static_cast<int>(policy.codebook_search) > static_cast<int>(CodebookSearch::kLsh)) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.codebook_search is not a known search (got ",
                     static_cast<int>(policy.codebook_search), ")"));
  }
  if (!(policy.beta >= 0.0 && policy.beta < 1.0)) return OutOfRange("beta", "[0, 1)", policy.beta);
  if (!(policy.zigzag_tau > 0.0 && policy.zigzag_tau <= 1.0)) {
    return OutOfRange("zigzag_tau", "(0, 1]", policy.zigzag_tau);
  }
  if (!(policy.zigzag_min_fraction >= 0.0 && policy.zigzag_min_fraction <= 1.0)) {
    return OutOfRange("zigzag_min_fraction", "[0, 1]", policy.zigzag_min_fraction);
  }
  if (!(policy.theta_k > 0.0f && policy.theta_k <= 1.0f)) {
    return OutOfRange("theta_k", "(0, 1]", policy.theta_k);
  }
  if (!(policy.theta_v > 0.0f && policy.theta_v <= 1.0f)) {
    return OutOfRange("theta_v", "(0, 1]", policy.theta_v);
  }
  if (policy.append_batch == 0) {
    return absl::InvalidArgumentError("policy.append_batch must be >= 1 (got 0)");
  }
  if (policy.scoring == Scoring::kWindow && policy.schedule != BudgetSchedule::kFull &&
      policy.window == 0) {
    return absl::InvalidArgumentError(
        "policy.window must be > 0 for window scoring (the observation window is the scoring "
        "queries' span)");
  }
  if (policy.pooling != Pooling::kNone &&
      (policy.pool_kernel == 0 || policy.pool_kernel % 2 == 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.pool_kernel must be odd (got ", policy.pool_kernel, ")"));
  }
  if (policy.schedule == BudgetSchedule::kZigZag && policy.scoring == Scoring::kSinksRecent) {
    return absl::InvalidArgumentError(
        "policy.schedule zigzag needs attention scores, but policy.scoring sinks+recent has "
        "none");
  }
  return absl::OkStatus();
}

}  // namespace cachemgr::compress
