// LlamaEngine: the forward pass of a Llama-architecture model (RMSNorm, RoPE, GQA attention,
// SwiGLU) whose KV cache is the sidecar's (SidecarCache): every token's K and V are written into
// the shared pool, and attention reads each layer's rows back through its block table, whatever
// Compress left there.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tools/engine/checkpoint.h"
#include "tools/engine/sidecar_cache.h"
#include "tools/engine/thread_pool.h"

namespace cachemgr::engine {

struct ForwardOptions {
  // Logits for every token (teacher forcing) instead of the last one only.
  bool all_logits = false;
  // Record the post-RoPE queries of the last `window_queries` tokens of this call, per layer
  // (the observation window Compress scores with).
  uint32_t window_queries = 0;
  // Accumulate, per layer and query head, the attention every token of this call paid to each
  // row (H2O's scores, sent to Compress as precomputed scores).
  bool attention_sums = false;
  // Tokens per step (one Allocate and one batched pass each).
  uint32_t chunk = 256;
};

struct ForwardResult {
  std::vector<float> logits;          // [tokens or 1, vocab_size]
  std::vector<float> window_queries;  // [num_layers, window_queries, num_heads, head_dim]
  std::vector<float> attention_sums;  // [num_layers, num_heads, rows of layer 0 after the call]
};

class LlamaEngine {
 public:
  // `checkpoint`, `cache` and `pool` must outlive the engine.
  LlamaEngine(const Checkpoint& checkpoint, SidecarCache* cache, ThreadPool* pool);

  const LlamaConfig& config() const { return config_; }

  // Runs `tokens` through the model, appended to `seq` at its next positions. Fails with the
  // session's status if the sidecar session was lost before it finished (its reads of the pool
  // may then have come from the revoked mapping).
  absl::StatusOr<ForwardResult> Forward(const std::string& seq, absl::Span<const uint32_t> tokens,
                                        const ForwardOptions& options = {});

 private:
  enum class LogitsMode { kNone, kLast, kAll };
  // One Allocate and one batched pass; captures the window queries of tokens[queries_from..].
  absl::Status ForwardChunk(const std::string& seq, absl::Span<const uint32_t> tokens,
                            LogitsMode logits, uint32_t queries_from, bool attention_sums,
                            ForwardResult* result);

  const LlamaConfig& config_;
  const LlamaWeights& weights_;
  SidecarCache* cache_;
  ThreadPool* pool_;
  std::vector<float> rows_k_, rows_v_;  // one layer's rows, reused
};

}  // namespace cachemgr::engine
