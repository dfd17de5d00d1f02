// One evaluation sample on the real engine and daemon: prefill the prompt once, measure FullKV
// (teacher-forced NLL of the continuation, greedy continuation), then for every policy and ratio
// fork the prefilled sequence, compress the fork through the daemon, and measure the same on it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tools/engine/llama.h"
#include "tools/engine/sidecar_cache.h"
#include "tools/engine/tokenizer.h"
#include "tools/eval/datasets.h"
#include "tools/eval/observations.h"
#include "tools/eval/variants.h"

namespace cachemgr::eval {

struct EvalConfig {
  std::vector<Variant> variants;
  std::vector<double> ratios;  // reserve ratios, or byte ratios with kByteRatio
  client::CompressTargetKind target = client::CompressTargetKind::kReserveRatio;
  uint32_t window = 32;  // observation window (queries recorded at prefill)
  uint32_t greedy = 64;  // greedy tokens compared with FullKV's
};

struct TrialResult {
  std::string sample;
  std::string policy;  // "fullkv-reference" for the uncompressed baseline
  double target = 1.0;
  bool ok = true;
  std::string error;  // when !ok (e.g. a byte ratio the policy cannot reach)
  // Mean negative log-likelihood (nats) of the continuation tokens predicted from the
  // (compressed) cache: tokens 1..n-1 (token 0 is predicted by the prefill itself, before
  // Compress, and is the same for every policy).
  double nll = 0;
  uint32_t nll_tokens = 0;
  std::vector<uint32_t> greedy_tokens;
  double greedy_agreement = 1;    // share of the greedy positions equal to FullKV's
  uint32_t first_divergence = 0;  // greedy tokens before the first difference from FullKV
  bool exact_match = false;       // retrieval samples: the greedy text contains the answer
                                  // (RULER's string_match, case-insensitive)
  std::string greedy_text;
  double honest_ratio = 1;   // Compress: bytes held / full bytes (vector granularity)
  double eq15_ratio = 1;     // the paper's eq. 15
  double block_ratio = 1;    // whole blocks + arena after / whole blocks before
  double reserve_ratio = 1;  // r used (searched for byte targets)
  uint32_t codebook_layers = 0;
  double compress_ms = 0;
  double decode_ms_per_token = 0;
};

// Called after each trial with (trials done in this sample, trials of this sample, result).
using TrialCallback = std::function<void(size_t, size_t, const TrialResult&)>;

// Trials per sample for `config` (the reference included).
size_t TrialsPerSample(const EvalConfig& config);

// Runs every trial of `sample`; the first result is the FullKV reference. The sequences it
// creates ("eval-...") are freed before it returns. Errors of single trials are recorded in
// their results; a failing prefill or reference fails the call. With `observations`, the
// prefilled FullKV sequence is added to it (seeded by `seed`).
absl::StatusOr<std::vector<TrialResult>> RunSample(
    engine::LlamaEngine& engine, engine::SidecarCache& cache, const engine::Tokenizer& tokenizer,
    const Sample& sample, const EvalConfig& config, const TrialCallback& on_trial,
    Observations* observations = nullptr, uint64_t seed = 1);

}  // namespace cachemgr::eval
