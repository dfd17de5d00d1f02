// Token selection: which tokens each KV head of a layer keeps (paper eq. 7).
//
// Every KV head keeps the same number of tokens: k context tokens plus the whole observation
// window [l_c, l). Outputs are [num_kv_heads, k + l_w] original token indices, ascending within
// each head. Thread-compatible; no shared state.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "cachemgr/compress/budget.h"
#include "cachemgr/compress/compress.h"

namespace cachemgr::compress {

// Where the per-query-head rankings of SelectTopK's kRepeat case run: the seam through which the
// CUDA backend ranks on the device (kernels/cuda/rank_topk.h, bit-identical to RankTopK).
// Rank() writes, for each of num_rows rows of `scores` [num_rows, context], the first k tokens
// of RankTopK's ranking to ranked [num_rows, k]. Host memory. Thread-safe: CompressSequence
// selects layers on several threads.
class TopKRanker {
 public:
  virtual ~TopKRanker() = default;
  virtual absl::Status Rank(absl::Span<const float> scores, uint32_t num_rows, uint32_t context,
                            uint32_t k, uint32_t* ranked) const = 0;
};

// Per KV head, k context tokens chosen from `scores` [num_score_heads, l_c], then the window.
//   num_score_heads == num_kv_heads (group mean, or no GQA): the k highest scores of the head;
//     among equal scores the lower index wins. Linear time per head.
//   num_score_heads == g * num_kv_heads, g > 1 (GqaMode::kRepeat: one row per query head, Hugging
//     Face repeat_kv order, query heads h*g .. h*g+g-1 serve KV head h): every query head ranks
//     the context by descending score (ties to the lower index) and the KV head takes the
//     group's rankings round-robin -- rank 0 of each query head in head order, then rank 1, ...
//     -- skipping tokens already taken, until it holds k distinct tokens. Each query head thus
//     keeps its own best tokens, and the layer still stores exactly k rows per KV head (the
//     bytes of the budget, unlike storing every query head's copy). O(l_c log k) per query head.
// `ranker` ranks the query heads' rows of the kRepeat case (null: RankTopK here); its errors
// pass through.
// REQUIRES: k <= split.context, num_score_heads % num_kv_heads == 0,
// scores.size() == num_score_heads * l_c.
absl::Status SelectTopK(absl::Span<const float> scores, uint32_t num_score_heads,
                        uint32_t num_kv_heads, const WindowSplit& split, uint32_t k,
                        std::vector<uint32_t>* kept, const TopKRanker* ranker = nullptr);

// The two steps of the kRepeat case, exposed for the CUDA path (kernels/cuda/rank_topk.h ranks
// on the device, bit-identical to RankTopK) and its parity tests.
// The first k tokens of one score row's ranking: descending score, ties to the lower index.
// REQUIRES: k <= row.size().
void RankTopK(absl::Span<const float> row, uint32_t k, std::vector<uint32_t>* ranked);
// Round-robin union of a group's rankings ([group, k]: rank 0 of each in order, then rank 1,
// ..., skipping tokens taken) until k distinct tokens, written to out[0, k) ascending.
// REQUIRES: every ranking holds k distinct tokens below `context`.
void MergeRankings(absl::Span<const uint32_t> rankings, uint32_t group, uint32_t context,
                   uint32_t k, uint32_t* out);

// StreamingLLM: context tokens [0, min(sinks, k)) and the k - min(sinks, k) context tokens just
// before the window, then the window; identical for every head.
void SelectSinksRecent(uint32_t num_heads, const WindowSplit& split, uint32_t k, uint32_t sinks,
                       std::vector<uint32_t>* kept);

// Every token [0, l) for every head (FullKV, or a layer whose budget is its whole context).
void SelectAll(uint32_t num_heads, uint32_t num_tokens, std::vector<uint32_t>* kept);

}  // namespace cachemgr::compress
