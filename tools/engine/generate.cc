#include "tools/engine/generate.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include "absl/strings/str_cat.h"
#include "cachemgr/util/status_macros.h"
#include "tools/engine/ops.h"

namespace cachemgr::engine {

absl::StatusOr<client::CompressResult> CompressPrefilled(SidecarCache& cache,
                                                         const std::string& seq,
                                                         const ForwardResult& prefill,
                                                         client::CompressOptions options) {
  // Per layer: window queries [num_queries, num_heads, head_dim], scores [num_heads, n]; each
  // rank's input buffer gets its share of the heads (SidecarCache::WriteInputs).
  const LlamaConfig& c = cache.config();
  const std::vector<float>* input = nullptr;
  size_t outer_per_layer = 1, inner = 0;
  if (options.input == client::CompressInputSource::kWindowQueries) {
    input = &prefill.window_queries;
    options.num_queries = static_cast<uint32_t>(
        prefill.window_queries.size() / (size_t{c.num_layers} * c.num_heads * c.head_dim()));
    outer_per_layer = options.num_queries;
    inner = c.head_dim();
  } else if (options.input == client::CompressInputSource::kScores) {
    input = &prefill.attention_sums;
    inner = prefill.attention_sums.size() / (size_t{c.num_layers} * c.num_heads);
  }
  if (input != nullptr) {
    if (input->empty()) {
      return absl::InvalidArgumentError("the prefill recorded none of the inputs Compress needs");
    }
    RETURN_IF_ERROR(cache.WriteInputs(*input, outer_per_layer, inner));
  }
  ASSIGN_OR_RETURN(client::CompressResult result, cache.Compress(seq, options));
  if (!result.pending) RETURN_IF_ERROR(cache.Fetch(seq).status());
  return result;
}

absl::Status ApplyBackgroundCompress(SidecarCache& cache, const std::string& seq, bool wait,
                                     std::optional<client::CompressResult>* compressed) {
  if (!compressed->has_value() || !(*compressed)->pending) return absl::OkStatus();
  ASSIGN_OR_RETURN(client::CompressResult r, cache.FinishCompress(seq, wait));
  if (r.pending) return absl::OkStatus();
  RETURN_IF_ERROR(cache.Fetch(seq).status());
  *compressed = std::move(r);
  return absl::OkStatus();
}

namespace {

// Prefills `prompt` into `seq` (compressing it if asked), then feeds `replay` one token at a
// time, as decoding did; returns the logits after the last token.
absl::StatusOr<std::vector<float>> BuildSequence(LlamaEngine& engine, SidecarCache& cache,
                                                 const std::string& seq,
                                                 const std::vector<uint32_t>& prompt,
                                                 const std::vector<uint32_t>& replay,
                                                 const GenerateOptions& options,
                                                 GenerateResult* out) {
  ForwardOptions prefill_options;
  if (options.compress.has_value()) {
    if (options.compress->input == client::CompressInputSource::kWindowQueries) {
      prefill_options.window_queries = std::min<uint32_t>(
          static_cast<uint32_t>(prompt.size()), options.compress->policy.window.value_or(32));
    }
    prefill_options.attention_sums =
        options.compress->input == client::CompressInputSource::kScores;
  }
  ASSIGN_OR_RETURN(ForwardResult prefill, engine.Forward(seq, prompt, prefill_options));
  if (options.compress.has_value()) {
    ASSIGN_OR_RETURN(out->compressed, CompressPrefilled(cache, seq, prefill, *options.compress));
  }
  std::vector<float> logits = std::move(prefill.logits);
  for (const uint32_t token : replay) {
    ASSIGN_OR_RETURN(ForwardResult r, engine.Forward(seq, {&token, 1}));
    logits = std::move(r.logits);
  }
  return logits;
}

// The decoding loop from `next`, the token the prompt's last logits chose: emits tokens until a
// stop token or options.steps, feeding each one back through `forward` (which returns the
// logits after it).
absl::Status DecodeLoop(
    const Tokenizer& tokenizer, uint32_t vocab, uint32_t previous, uint32_t next,
    const GenerateOptions& options,
    const std::function<absl::StatusOr<std::vector<float>>(uint32_t token)>& forward,
    GenerateResult* out) {
  for (uint32_t step = 0; step < options.steps; ++step) {
    if (std::find(options.stop_tokens.begin(), options.stop_tokens.end(), next) !=
        options.stop_tokens.end()) {
      break;
    }
    out->tokens.push_back(next);
    out->text += tokenizer.Decode(previous, next);
    previous = next;
    if (options.on_step) options.on_step(step);
    if (step + 1 == options.steps) break;
    ASSIGN_OR_RETURN(std::vector<float> logits, forward(next));
    next = Argmax(logits.data(), vocab);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PrefillResult> PrefillGreedy(LlamaEngine& engine, SidecarCache& cache,
                                            const std::string& seq,
                                            const std::vector<uint32_t>& prompt,
                                            const GenerateOptions& options) {
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt must not be empty");
  if (cache.has(seq)) {
    return absl::AlreadyExistsError(absl::StrCat("sequence \"", seq, "\" already exists"));
  }
  GenerateResult scratch;
  ASSIGN_OR_RETURN(std::vector<float> logits,
                   BuildSequence(engine, cache, seq, prompt, {}, options, &scratch));
  PrefillResult out;
  out.first_token = Argmax(logits.data(), engine.config().vocab_size);
  out.compressed = std::move(scratch.compressed);
  return out;
}

absl::StatusOr<GenerateResult> DecodeGreedy(LlamaEngine& engine, SidecarCache& cache,
                                            const Tokenizer& tokenizer, const std::string& seq,
                                            uint32_t last_prompt_token, uint32_t first_token,
                                            const GenerateOptions& options) {
  if (!cache.has(seq)) {
    return absl::NotFoundError(absl::StrCat("sequence \"", seq, "\" is not in the sidecar"));
  }
  GenerateResult out;
  RETURN_IF_ERROR(DecodeLoop(
      tokenizer, engine.config().vocab_size, last_prompt_token, first_token, options,
      [&](uint32_t token) -> absl::StatusOr<std::vector<float>> {
        ASSIGN_OR_RETURN(ForwardResult r, engine.Forward(seq, {&token, 1}));
        return std::move(r.logits);
      },
      &out));
  return out;
}

absl::StatusOr<GenerateResult> GenerateGreedy(LlamaEngine& engine, SidecarCache& cache,
                                              const Tokenizer& tokenizer, const std::string& seq,
                                              const std::vector<uint32_t>& prompt,
                                              const GenerateOptions& options) {
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt must not be empty");
  if (cache.has(seq)) {
    return absl::AlreadyExistsError(absl::StrCat("sequence \"", seq, "\" already exists"));
  }
  GenerateResult out;
  // Runs `step`; after a sidecar failure, recovers and rebuilds the sequence from the prompt and
  // the tokens generated so far instead.
  auto with_recovery =
      [&](absl::StatusOr<std::vector<float>> logits) -> absl::StatusOr<std::vector<float>> {
    while (!logits.ok() && options.sidecar_recovery_timeout > absl::ZeroDuration() &&
           out.sidecar_recoveries < options.max_sidecar_recoveries) {
      RETURN_IF_ERROR(cache.Recover(logits.status(), options.sidecar_recovery_timeout));
      ++out.sidecar_recoveries;
      logits = BuildSequence(engine, cache, seq, prompt, out.tokens, options, &out);
    }
    return logits;
  };
  ASSIGN_OR_RETURN(std::vector<float> logits,
                   with_recovery(BuildSequence(engine, cache, seq, prompt, {}, options, &out)));
  const uint32_t vocab = engine.config().vocab_size;
  RETURN_IF_ERROR(DecodeLoop(
      tokenizer, vocab, prompt.back(), Argmax(logits.data(), vocab), options,
      [&](uint32_t token) -> absl::StatusOr<std::vector<float>> {
        // A background compression is applied at the first step after its work is done (the
        // forward wrote every row it appended, so none is in flight).
        absl::Status applied = ApplyBackgroundCompress(cache, seq, /*wait=*/false, &out.compressed);
        absl::StatusOr<ForwardResult> r = applied.ok() ? engine.Forward(seq, {&token, 1})
                                                       : absl::StatusOr<ForwardResult>(applied);
        return with_recovery(r.ok() ? absl::StatusOr<std::vector<float>>(std::move(r->logits))
                                    : r.status());
      },
      &out));
  // Still working when decoding ended: the sequence is left compressed all the same.
  RETURN_IF_ERROR(ApplyBackgroundCompress(cache, seq, /*wait=*/true, &out.compressed));
  return out;
}

}  // namespace cachemgr::engine
