#include "cachemgr/compress/budget.h"

#include <algorithm>
#include <cmath>
#include <functional>

namespace cachemgr::compress {

WindowSplit SplitWindow(uint32_t num_tokens, uint32_t window) {
  WindowSplit split;
  split.num_tokens = num_tokens;
  split.window = std::min(window, num_tokens);
  split.context = num_tokens - split.window;
  return split;
}

double ContextRatio(double reserve_ratio, const WindowSplit& split) {
  if (split.context == 0) return 1.0;
  const double kept_context =
      reserve_ratio * static_cast<double>(split.num_tokens) - static_cast<double>(split.window);
  if (kept_context <= 0.0) return 0.0;
  return std::clamp(kept_context / static_cast<double>(split.context), 0.0, 1.0);
}

std::vector<double> UniformContextRatios(double context_ratio, uint32_t num_layers) {
  return std::vector<double>(num_layers, context_ratio);
}

std::vector<double> PyramidContextRatios(double context_ratio, uint32_t num_layers, double beta) {
  if (num_layers <= 1 || context_ratio <= beta) {
    return UniformContextRatios(context_ratio, num_layers);
  }
  const double alpha = 0.5 * (1.0 + beta);
  double first;
  double last;
  if (context_ratio <= alpha) {
    first = 2.0 * context_ratio - beta;
    last = beta;
  } else {
    first = 1.0;
    last = 2.0 * context_ratio - 1.0;
  }
  std::vector<double> ratios(num_layers);
  const double step = (last - first) / static_cast<double>(num_layers - 1);
  for (uint32_t layer = 0; layer < num_layers; ++layer) {
    ratios[layer] = std::clamp(first + step * layer, 0.0, 1.0);
  }
  ratios.back() = last;  // exact endpoint, no accumulated rounding
  return ratios;
}

uint32_t HeadMinimumBudget(absl::Span<const float> mass, double tau, std::vector<float>* scratch) {
  std::vector<float>& values = *scratch;
  values.resize(mass.size());
  double total = 0.0;
  for (size_t i = 0; i < mass.size(); ++i) {
    const float m = mass[i] > 0.0f ? mass[i] : 0.0f;  // also maps NaN to 0
    values[i] = m;
    total += m;
  }
  double need = tau * total;
  if (!(need > 0.0)) return 0;
  // Weighted selection: split around the median, keep the heavy half whole when it does not
  // reach `need`, otherwise descend into it. Expected linear time.
  uint32_t count = 0;
  auto begin = values.begin();
  auto end = values.end();
  while (end - begin > 1) {
    auto mid = begin + (end - begin - 1) / 2;
    std::nth_element(begin, mid, end, std::greater<float>());
    double heavy = 0.0;  // [begin, mid] all >= the rest
    for (auto it = begin; it <= mid; ++it) heavy += *it;
    if (heavy >= need) {
      end = mid + 1;
    } else {
      count += static_cast<uint32_t>(mid + 1 - begin);
      need -= heavy;
      begin = mid + 1;
    }
  }
  // One candidate left (or none when rounding left `need` positive after taking everything).
  if (end - begin == 1) ++count;
  return std::min<uint32_t>(count, static_cast<uint32_t>(mass.size()));
}

std::vector<double> ZigZagContextRatios(double context_ratio, uint32_t context,
                                        absl::Span<const double> lmba, double min_fraction) {
  const size_t num_layers = lmba.size();
  if (context == 0) return std::vector<double>(num_layers, 1.0);
  double lmba_sum = 0.0;
  for (double v : lmba) lmba_sum += std::max(v, 0.0);
  if (!(lmba_sum > 0.0)) return UniformContextRatios(context_ratio, num_layers);

  const double l_c = static_cast<double>(context);
  const double avg = context_ratio * l_c;
  const double min_budget = min_fraction * avg;
  const double layers = static_cast<double>(num_layers);
  std::vector<double> budgets(num_layers);
  double excess = 0.0;
  double headroom = 0.0;
  for (size_t l = 0; l < num_layers; ++l) {
    const double uncertainty = std::max(lmba[l], 0.0) / lmba_sum;
    const double raw = min_budget + (avg - min_budget) * layers * uncertainty;
    if (raw > l_c) excess += raw - l_c;
    budgets[l] = std::clamp(raw, 0.0, l_c);
    if (raw < l_c) headroom += l_c - budgets[l];
  }
  if (excess > 0.0 && headroom > 0.0) {
    const double share = std::min(1.0, excess / headroom);
    for (double& budget : budgets) {
      if (budget < l_c) budget = std::min(l_c, budget + share * (l_c - budget));
    }
  }
  std::vector<double> ratios(num_layers);
  for (size_t l = 0; l < num_layers; ++l) ratios[l] = budgets[l] / l_c;
  return ratios;
}

uint32_t KeptContextCount(double layer_ratio, uint32_t context) {
  if (!(layer_ratio > 0.0)) return 0;
  const double kept = std::floor(layer_ratio * static_cast<double>(context) + 1e-9);
  return static_cast<uint32_t>(std::min(kept, static_cast<double>(context)));
}

std::vector<double> LayerContextRatios(const PolicyConfig& policy, uint32_t num_layers,
                                       double context_ratio, uint32_t context,
                                       absl::Span<const double> lmba) {
  switch (policy.schedule) {
    case BudgetSchedule::kFull:
      return std::vector<double>(num_layers, 1.0);
    case BudgetSchedule::kUniform:
      return UniformContextRatios(context_ratio, num_layers);
    case BudgetSchedule::kPyramid:
      return PyramidContextRatios(context_ratio, num_layers, policy.beta);
    case BudgetSchedule::kZigZag:
      if (lmba.size() != num_layers) return UniformContextRatios(context_ratio, num_layers);
      return ZigZagContextRatios(context_ratio, context, lmba, policy.zigzag_min_fraction);
  }
  return UniformContextRatios(context_ratio, num_layers);
}

}  // namespace cachemgr::compress
