// Evaluation outputs: one CSV row per trial, a summary per (policy, target) in JSON, and the
// markdown table the tool prints.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tools/eval/evaluator.h"

namespace cachemgr::eval {

struct Summary {
  std::string policy;
  double target = 1;
  uint32_t trials = 0;   // successful
  uint32_t failed = 0;   // e.g. byte targets the policy cannot reach on some samples
  double nll = 0;        // mean over samples of the per-sample mean NLL
  double delta_nll = 0;  // mean of (NLL - FullKV NLL), paired per sample
  double ppl = 0;        // exp(nll)
  double ppl_ratio = 1;  // exp(delta_nll)
  double greedy_agreement = 1;
  double first_divergence = 0;
  double exact_match = 0;  // share of retrieval samples answered exactly
  double honest_ratio = 1;
  double eq15_ratio = 1;
  double block_ratio = 1;
  double reserve_ratio = 1;
  double codebook_layers = 0;
  double compress_ms = 0;
  double decode_ms_per_token = 0;
};

// Groups by (policy, target) in first-seen order; the reference has policy "fullkv-reference".
std::vector<Summary> Summarize(const std::vector<TrialResult>& trials);

struct RunInfo {
  std::string model;
  std::string dataset;
  uint32_t samples = 0;
  std::string target_kind;  // "reserve_ratio" or "byte_ratio"
  uint32_t window = 0, greedy = 0, continuation = 0;
  uint64_t seed = 0;
  double seconds = 0;
};

absl::Status WriteTrialsCsv(const std::string& path, const std::vector<TrialResult>& trials);
absl::Status WriteSummaryJson(const std::string& path, const RunInfo& info,
                              const std::vector<Summary>& summary);
// A markdown table, one row per summary.
std::string SummaryTable(const std::vector<Summary>& summary, bool retrieval);

}  // namespace cachemgr::eval
