// Per-layer token budgets: how many context tokens each layer keeps (paper eq. 5-7, corrected
// as MISSION.md §4 says, plus the uniform and ZigZag schedules).
//
// Vocabulary (paper §3.3): a sequence of l tokens is split into the context (tokens
// [0, l_c)) and the observation window (the last l_w tokens, always kept). The reserve ratio r
// is the fraction of all tokens kept on average; the context ratio r_c the fraction of the
// context kept on average; r_c(lambda) the context ratio of layer lambda. A layer keeps
// k_lambda = KeptContextCount(r_c(lambda), l_c) context tokens plus the window.
//
// All functions are pure and thread-compatible.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "cachemgr/compress/compress.h"

namespace cachemgr::compress {

struct WindowSplit {
  uint32_t num_tokens = 0;  // l
  uint32_t window = 0;      // l_w actually kept: min(policy window, l)
  uint32_t context = 0;     // l_c = l - window
};

WindowSplit SplitWindow(uint32_t num_tokens, uint32_t window);

// r_c = (r * l - l_w) / l_c, clamped to [0, 1]. Edge cases: l_c == 0 (l <= l_w: everything is
// window) gives 1; r * l <= l_w gives 0 (the window alone). REQUIRES: r in (0, 1].
double ContextRatio(double reserve_ratio, const WindowSplit& split);

// Every layer at r_c.
std::vector<double> UniformContextRatios(double context_ratio, uint32_t num_layers);

// Eq. 5-6, corrected so that the mean over layers is r_c, with alpha = (1 + beta) / 2:
//   r_c <= beta:          every layer r_c (uniform; a pyramid would need a layer below beta)
//   beta < r_c <= alpha:  r_c(0) = 2 r_c - beta, r_c(m-1) = beta
//   alpha < r_c <= 1:     r_c(0) = 1,          r_c(m-1) = 2 r_c - 1
// and r_c(lambda) = r_c(0) + (r_c(m-1) - r_c(0)) * lambda / (m - 1). One layer: r_c.
// REQUIRES: context_ratio in [0, 1], beta in [0, 1), num_layers >= 1.
std::vector<double> PyramidContextRatios(double context_ratio, uint32_t num_layers, double beta);

// LMBA of one attention head (ZigZagKV's "layer minimum budget for attention"): the fewest
// tokens, taken by decreasing mass, whose mass sum reaches tau * (total mass). Negative (and
// NaN) masses count as 0. Returns 0 when the total is 0. `scratch` is reused storage.
// Expected O(n) (selection, no full sort). REQUIRES: tau in (0, 1].
uint32_t HeadMinimumBudget(absl::Span<const float> mass, double tau, std::vector<float>* scratch);

// ZigZag schedule from each layer's LMBA (real-valued: the mean over its heads):
//   uncertainty_l = LMBA_l / sum(LMBA);  B_avg = r_c * l_c;  B_min = min_fraction * B_avg;
//   budget_l = B_min + (B_avg - B_min) * L * uncertainty_l, clamped to [0, l_c].
// Tokens lost by clamping at l_c are handed to the unclamped layers in proportion to their
// headroom (l_c - budget_l), which never overshoots because sum(budgets) = L * B_avg <= L * l_c;
// so sum(budget_l) == L * B_avg (up to rounding). Returns budget_l / l_c. sum(LMBA) == 0 gives
// the uniform schedule; l_c == 0 gives all ones.
// REQUIRES: lmba.size() >= 1, context_ratio in [0, 1], min_fraction in [0, 1].
std::vector<double> ZigZagContextRatios(double context_ratio, uint32_t context,
                                        absl::Span<const double> lmba, double min_fraction);

// Eq. 7: k = floor(r_c(lambda) * l_c), computed as floor(ratio * l_c + 1e-9) so that ratios
// like 0.29 * 100 (= 28.999999999999996 in double) give the intended 29; at most l_c.
uint32_t KeptContextCount(double layer_ratio, uint32_t context);

// The schedule of `policy`: kFull gives all ones; kUniform / kPyramid / kZigZag as above
// (`lmba` is only read by kZigZag; with other than num_layers entries it falls back to
// uniform).
std::vector<double> LayerContextRatios(const PolicyConfig& policy, uint32_t num_layers,
                                       double context_ratio, uint32_t context,
                                       absl::Span<const double> lmba);

}  // namespace cachemgr::compress
