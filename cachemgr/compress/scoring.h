// Token scoring: how important each context token of one layer is, per selection head
// (paper eq. 1-3, SnapKV's pooled window sum, H2O's accumulated attention).
//
// The pipeline for one layer, each step a function below so it can be mirrored exactly:
//   1. Column sums (AttentionColumnSums): for every query head h and token a,
//        sums[h][a] = sum over the provided queries j of A[h][j][a],
//      A = softmax over keys 0..p_j of q_j . k_a / sqrt(head_dim) (eq. 1, causal), where query j
//      of num_queries sits at token index p_j = num_tokens - num_queries + j. Precomputed scores
//      (LayerInput::scores, [num_q_heads, num_tokens]) replace these sums verbatim.
//      Scoring::kWindow uses every provided query as the observation window;
//      Scoring::kAccumulated (H2O) the same sum, normally over many more queries.
//   2. Normalization (kWindow only): kLiteral divides token a's sum by (num_tokens - a) (eq. 2
//      as printed); kSum leaves it (SnapKV's code).
//   3. Pooling (kWindow only), over the context tokens [0, l_c) alone (the window columns are
//      dropped first, as SnapKV pools attn_weights_sum[..., :-window]), stride 1, odd kernel k,
//      p = k / 2 cells of padding each side:
//        kAvg: out[a] = (1/k) * sum of in[a-p .. a+p], cells outside [0, l_c) counting as 0 —
//              exactly torch.nn.functional.avg_pool1d(kernel k, padding p, stride 1) with its
//              default count_include_pad=True, which SnapKV uses. Edge tokens are damped.
//        kMax: out[a] = max of the in-range cells of in[a-p .. a+p] (max_pool1d pads with -inf).
//   4. GQA (eq. 3): kGroupMean averages the h_n query heads g*h_n .. g*h_n+h_n-1 of KV head g
//      (Hugging Face repeat_kv order) into one score row per KV head; kRepeat keeps one row per
//      query head (SelectTopK merges them per KV head). Steps 2-3 run per query head, before
//      the mean.
//   NaN scores become -infinity (never selected before a finite score).
// Numerics: logits and probabilities in float (q pre-scaled by 1/sqrt(head_dim)), exp by a
// polynomial (relative error ~1e-7) clamped at e^-87, so a probability is never exactly 0 for
// a visible key; row sums of the softmax in double. Mirrors should compare with a relative
// tolerance (~1e-5), not bit for bit.
//
// Cost: num_q_heads * num_queries * num_tokens * head_dim multiply-adds; memory O(num_tokens *
// (num_q_heads + a small query tile)), never num_queries x num_tokens for all queries at once.
// Thread-compatible; no shared state.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachemgr/compress/budget.h"
#include "cachemgr/compress/compress.h"

namespace cachemgr::compress {

// Step 1. keys [num_tokens, num_kv_heads, head_dim], queries [num_queries, num_q_heads,
// head_dim], both post-RoPE. Writes sums [num_q_heads, num_tokens] (resized).
// REQUIRES: 1 <= num_queries <= num_tokens, num_q_heads % num_kv_heads == 0.
void AttentionColumnSums(const ModelShape& shape, uint32_t num_tokens, const float* keys,
                         const float* queries, uint32_t num_queries, std::vector<float>* sums);

// Step 2, kLiteral, on one head's first row.size() tokens: row[a] /= (num_tokens - a).
// REQUIRES: row.size() <= num_tokens.
void DivideByDistanceToEnd(uint32_t num_tokens, absl::Span<float> row);

// Step 3 on one head's context row. kNone copies. REQUIRES: kernel odd, out.size() == in.size().
void Pool1d(Pooling pooling, uint32_t kernel, absl::Span<const float> in, absl::Span<float> out);

// Per-layer output of the pipeline.
struct LayerScores {
  // Score rows: num_q_heads under GqaMode::kRepeat (when num_q_heads > num_kv_heads), else
  // num_kv_heads.
  uint32_t num_heads = 0;
  uint32_t context = 0;       // l_c
  std::vector<float> scores;  // [num_heads, context]
  // Mean over query heads of HeadMinimumBudget(sums[h][0, l_c), zigzag_tau) on the raw step-1
  // sums; only filled when requested (the ZigZag schedule).
  double lmba = 0.0;
};

// Runs steps 1-4 for policy.scoring kWindow or kAccumulated. Uses layer.queries when set, else
// layer.scores. INVALID_ARGUMENT when neither is set, or num_queries is outside
// [1, num_tokens]; the message names "input.layers[<layer_index>]".
// REQUIRES: shape validated, num_tokens == split.num_tokens.
absl::StatusOr<LayerScores> ScoreLayer(const ModelShape& shape, const PolicyConfig& policy,
                                       const LayerInput& layer, uint32_t layer_index,
                                       const WindowSplit& split, bool want_lmba);

}  // namespace cachemgr::compress
