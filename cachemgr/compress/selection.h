// Token selection: which tokens each selection head of a layer keeps (paper eq. 7).
//
// Every selection head keeps the same number of tokens: k context tokens plus the whole
// observation window [l_c, l). Outputs are [num_heads, k + l_w] original token indices,
// ascending within each head. Thread-compatible; no shared state.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "cachemgr/compress/budget.h"
#include "cachemgr/compress/compress.h"

namespace cachemgr::compress {

// Heads that select independently: one per query head with GqaMode::kRepeat, else one per KV
// head. kFull and kSinksRecent always use KV heads: their choice does not depend on the head,
// so repeating would only store identical copies.
uint32_t NumSelectionHeads(const ModelShape& shape, const PolicyConfig& policy);

// The KV head whose vectors selection head `head` keeps (head * num_kv_heads / num_heads).
inline uint32_t KvHeadOfSelectionHead(uint32_t head, uint32_t num_heads, uint32_t num_kv_heads) {
  return static_cast<uint32_t>(static_cast<uint64_t>(head) * num_kv_heads / num_heads);
}

// Per head, the k context tokens of highest score (scores [num_heads, l_c]); among equal scores
// the lower index wins (so -inf/NaN-free scores give a unique answer); then the window.
// Linear time per head. REQUIRES: k <= split.context, scores.size() == num_heads * l_c.
void SelectTopK(absl::Span<const float> scores, uint32_t num_heads, const WindowSplit& split,
                uint32_t k, std::vector<uint32_t>* kept);

// StreamingLLM: context tokens [0, min(sinks, k)) and the k - min(sinks, k) context tokens just
// before the window, then the window; identical for every head.
void SelectSinksRecent(uint32_t num_heads, const WindowSplit& split, uint32_t k, uint32_t sinks,
                       std::vector<uint32_t>* kept);

// Every token [0, l) for every head (FullKV, or a layer whose budget is its whole context).
void SelectAll(uint32_t num_heads, uint32_t num_tokens, std::vector<uint32_t>* kept);

}  // namespace cachemgr::compress
