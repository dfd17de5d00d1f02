#include "tools/eval/evaluator.h"

#include <chrono>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cachemgr/util/status_macros.h"
#include "tools/engine/generate.h"
#include "tools/engine/ops.h"

namespace cachemgr::eval {
namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Teacher forcing: feeds continuation[0..n-2] after `seq` and averages -log p of
// continuation[1..n-1].
absl::Status TeacherForce(engine::LlamaEngine& engine, const std::string& seq,
                          const std::vector<uint32_t>& continuation, TrialResult* r) {
  if (continuation.size() < 2) return absl::OkStatus();
  engine::ForwardOptions all;
  all.all_logits = true;
  const std::vector<uint32_t> fed(continuation.begin(), continuation.end() - 1);
  ASSIGN_OR_RETURN(engine::ForwardResult out, engine.Forward(seq, fed, all));
  const uint32_t vocab = engine.config().vocab_size;
  double sum = 0;
  for (size_t i = 0; i + 1 < continuation.size(); ++i) {
    sum -= engine::LogProb(&out.logits[i * vocab], vocab, continuation[i + 1]);
  }
  r->nll_tokens = static_cast<uint32_t>(continuation.size() - 1);
  r->nll = sum / r->nll_tokens;
  return absl::OkStatus();
}

// Greedy decoding of `steps` tokens after `seq`, starting from `first` (the prefill's argmax).
absl::Status Greedy(engine::LlamaEngine& engine, const engine::Tokenizer& tokenizer,
                    const std::string& seq, uint32_t last_prompt_token, uint32_t first,
                    uint32_t steps, TrialResult* r) {
  const auto t0 = Clock::now();
  uint32_t previous = last_prompt_token, next = first;
  for (uint32_t i = 0; i < steps; ++i) {
    r->greedy_tokens.push_back(next);
    r->greedy_text += tokenizer.Decode(previous, next);
    previous = next;
    if (i + 1 == steps) break;
    ASSIGN_OR_RETURN(engine::ForwardResult out, engine.Forward(seq, {&next, 1}));
    next = engine::Argmax(out.logits.data(), engine.config().vocab_size);
  }
  if (steps > 1) r->decode_ms_per_token = Ms(t0, Clock::now()) / (steps - 1);
  return absl::OkStatus();
}

void Compare(const TrialResult& reference, const std::string& answer, TrialResult* r) {
  const size_t n = std::min(reference.greedy_tokens.size(), r->greedy_tokens.size());
  uint32_t same = 0;
  r->first_divergence = static_cast<uint32_t>(n);
  for (size_t i = 0; i < n; ++i) {
    if (reference.greedy_tokens[i] == r->greedy_tokens[i]) {
      ++same;
    } else if (r->first_divergence == n) {
      r->first_divergence = static_cast<uint32_t>(i);
    }
  }
  r->greedy_agreement = n == 0 ? 1.0 : static_cast<double>(same) / n;
  if (!answer.empty()) {
    // RULER's string_match: the answer appears in the generated text (case-insensitive).
    r->exact_match =
        absl::StrContains(absl::AsciiStrToLower(r->greedy_text), absl::AsciiStrToLower(answer));
  }
}

}  // namespace

size_t TrialsPerSample(const EvalConfig& config) {
  size_t n = 1;
  for (const Variant& v : config.variants) n += v.ratio_independent ? 1 : config.ratios.size();
  return n;
}

absl::StatusOr<std::vector<TrialResult>> RunSample(engine::LlamaEngine& engine,
                                                   engine::SidecarCache& cache,
                                                   const engine::Tokenizer& tokenizer,
                                                   const Sample& sample, const EvalConfig& config,
                                                   const TrialCallback& on_trial,
                                                   Observations* observations, uint64_t seed) {
  const size_t total = TrialsPerSample(config);
  const std::string base = "eval-prompt";
  bool need_sums = false;
  for (const Variant& v : config.variants) {
    need_sums = need_sums || v.input == client::CompressInputSource::kScores;
  }
  engine::ForwardOptions prefill_options;
  prefill_options.window_queries =
      std::min<uint32_t>(config.window, static_cast<uint32_t>(sample.prompt.size()));
  prefill_options.attention_sums = need_sums;
  ASSIGN_OR_RETURN(engine::ForwardResult prefill,
                   engine.Forward(base, sample.prompt, prefill_options));
  if (observations != nullptr) RETURN_IF_ERROR(observations->Add(cache, base, prefill, seed));
  const uint32_t vocab = engine.config().vocab_size;
  const uint32_t first = engine::Argmax(prefill.logits.data(), vocab);
  const uint32_t last_prompt = sample.prompt.back();
  std::vector<TrialResult> out;

  // FullKV: forks of the prefilled sequence, untouched.
  TrialResult ref;
  ref.sample = sample.name;
  ref.policy = "fullkv-reference";
  RETURN_IF_ERROR(cache.Fork(base, "eval-ref"));
  RETURN_IF_ERROR(TeacherForce(engine, "eval-ref", sample.continuation, &ref));
  RETURN_IF_ERROR(cache.Free("eval-ref"));
  RETURN_IF_ERROR(cache.Fork(base, "eval-ref"));
  RETURN_IF_ERROR(Greedy(engine, tokenizer, "eval-ref", last_prompt, first, config.greedy, &ref));
  RETURN_IF_ERROR(cache.Free("eval-ref"));
  Compare(ref, sample.answer, &ref);
  out.push_back(ref);
  if (on_trial) on_trial(out.size(), total, out.back());

  for (const Variant& v : config.variants) {
    const std::vector<double> ratios =
        v.ratio_independent ? std::vector<double>{1.0} : config.ratios;
    for (double ratio : ratios) {
      TrialResult r;
      r.sample = sample.name;
      r.policy = v.name;
      r.target = ratio;
      auto trial = [&]() -> absl::Status {
        RETURN_IF_ERROR(cache.Fork(base, "eval-trial"));
        client::CompressOptions co;
        co.policy = v.policy;
        co.input = v.input;
        co.target_kind =
            v.ratio_independent ? client::CompressTargetKind::kReserveRatio : config.target;
        co.target = ratio;
        const auto t0 = Clock::now();
        ASSIGN_OR_RETURN(client::CompressResult c,
                         engine::CompressPrefilled(cache, "eval-trial", prefill, co));
        r.compress_ms = Ms(t0, Clock::now());
        r.honest_ratio = c.honest_ratio;
        r.eq15_ratio = c.eq15_ratio;
        r.reserve_ratio = c.reserve_ratio;
        r.block_ratio =
            c.bytes_before == 0 ? 1.0 : static_cast<double>(c.bytes_after) / c.bytes_before;
        for (const auto& l : c.layers) r.codebook_layers += l.codebook ? 1 : 0;
        RETURN_IF_ERROR(cache.Fork("eval-trial", "eval-greedy"));
        RETURN_IF_ERROR(TeacherForce(engine, "eval-trial", sample.continuation, &r));
        RETURN_IF_ERROR(
            Greedy(engine, tokenizer, "eval-greedy", last_prompt, first, config.greedy, &r));
        Compare(ref, sample.answer, &r);
        return absl::OkStatus();
      };
      if (absl::Status s = trial(); !s.ok()) {
        r.ok = false;
        r.error = std::string(s.message());
      }
      for (const char* id : {"eval-trial", "eval-greedy"}) {
        if (cache.has(id)) RETURN_IF_ERROR(cache.Free(id));
      }
      out.push_back(r);
      if (on_trial) on_trial(out.size(), total, out.back());
    }
  }
  RETURN_IF_ERROR(cache.Free(base));
  return out;
}

}  // namespace cachemgr::eval
