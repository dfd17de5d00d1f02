// Greedy generation on the sidecar: prefill a prompt, optionally compress it, then decode one
// token per step (one Allocate, one forward, argmax each).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachemgr/client/client.h"
#include "tools/engine/llama.h"
#include "tools/engine/tokenizer.h"

namespace cachemgr::engine {

struct GenerateOptions {
  uint32_t steps = 256;  // tokens to generate
  // Stop before emitting one of these (run.c stops at BOS); empty: never.
  std::vector<uint32_t> stop_tokens;
  // Compress the prompt before decoding (window queries of the prompt's last tokens, or the
  // prompt's attention sums for H2O); nullopt: FullKV. With compress->background (GenerateGreedy
  // only) decoding starts at once on the whole prompt and the compression is applied at the
  // first step after the daemon finished it (the tokens decoded meanwhile kept), or at the end.
  std::optional<client::CompressOptions> compress;
  // When the sidecar fails mid-generation (the daemon restarted, the session was lost), wait up
  // to this long for it (SidecarCache::Recover), then prefill the prompt again, compress it
  // again, and replay the tokens generated so far: the output is what an undisturbed run gives.
  // Zero: fail instead.
  absl::Duration sidecar_recovery_timeout = absl::Seconds(60);
  uint32_t max_sidecar_recoveries = 3;
  // Called after each generated token is chosen, before it is fed back (for progress and tests).
  std::function<void(uint32_t step)> on_step;
};

struct GenerateResult {
  std::vector<uint32_t> tokens;  // generated, prompt excluded
  std::string text;              // their decoded bytes
  std::optional<client::CompressResult> compressed;
  uint32_t sidecar_recoveries = 0;  // times the KV was recomputed after a sidecar failure
};

// The prompt must not be empty (start it with BOS to generate from scratch). `seq` must not
// exist yet; it is left in the sidecar (the caller frees it).
absl::StatusOr<GenerateResult> GenerateGreedy(LlamaEngine& engine, SidecarCache& cache,
                                              const Tokenizer& tokenizer, const std::string& seq,
                                              const std::vector<uint32_t>& prompt,
                                              const GenerateOptions& options);

// Prefill/decode disaggregation (docs/MULTINODE.md): PrefillGreedy prefills `prompt` into `seq`
// (compressing it as options.compress says) and picks the first token from the prompt's last
// logits; DecodeGreedy goes on from a sequence holding a prompt's KV, prefilled elsewhere and
// transferred into this sidecar, given the prompt's last token and the first token the prefill
// picked. Together they generate exactly what GenerateGreedy does in one process. Neither
// recovers from a sidecar failure (the KV came from elsewhere): the caller retries.
struct PrefillResult {
  uint32_t first_token = 0;
  std::optional<client::CompressResult> compressed;
};
absl::StatusOr<PrefillResult> PrefillGreedy(LlamaEngine& engine, SidecarCache& cache,
                                            const std::string& seq,
                                            const std::vector<uint32_t>& prompt,
                                            const GenerateOptions& options);
// `seq` must be in `cache` (SidecarCache::Adopt). options.steps counts first_token.
absl::StatusOr<GenerateResult> DecodeGreedy(LlamaEngine& engine, SidecarCache& cache,
                                            const Tokenizer& tokenizer, const std::string& seq,
                                            uint32_t last_prompt_token, uint32_t first_token,
                                            const GenerateOptions& options);

// Compresses `seq`, a prompt just prefilled with `prefill` (its window queries or attention
// sums, as options.input says), then fetches its codebook layers so decoding can go on. With
// options.background the result is pending: ApplyBackgroundCompress applies it.
absl::StatusOr<client::CompressResult> CompressPrefilled(SidecarCache& cache,
                                                         const std::string& seq,
                                                         const ForwardResult& prefill,
                                                         client::CompressOptions options);

// Applies the background compression of `seq` if `compressed` is pending (FinishCompress, then
// Fetch), waiting for the daemon's work only with `wait`; `compressed` becomes the result.
absl::Status ApplyBackgroundCompress(SidecarCache& cache, const std::string& seq, bool wait,
                                     std::optional<client::CompressResult>* compressed);

}  // namespace cachemgr::engine
