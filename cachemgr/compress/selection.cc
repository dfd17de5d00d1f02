#include "cachemgr/compress/selection.h"

#include <algorithm>
#include <functional>

namespace cachemgr::compress {

uint32_t NumSelectionHeads(const ModelShape& shape, const PolicyConfig& policy) {
  if (policy.schedule == BudgetSchedule::kFull || policy.scoring == Scoring::kSinksRecent) {
    return shape.num_kv_heads;
  }
  return policy.gqa == GqaMode::kRepeat ? shape.num_q_heads : shape.num_kv_heads;
}

void SelectTopK(absl::Span<const float> scores, uint32_t num_heads, const WindowSplit& split,
                uint32_t k, std::vector<uint32_t>* kept) {
  const uint32_t context = split.context;
  const uint32_t per_head = k + split.window;
  kept->resize(static_cast<size_t>(num_heads) * per_head);
  std::vector<float> scratch;
  for (uint32_t head = 0; head < num_heads; ++head) {
    const float* row = scores.data() + static_cast<size_t>(head) * context;
    uint32_t* out = kept->data() + static_cast<size_t>(head) * per_head;
    uint32_t n = 0;
    if (k == context) {
      for (uint32_t a = 0; a < context; ++a) out[n++] = a;
    } else if (k > 0) {
      // Threshold = the k-th largest score; take everything above it and the lowest-indexed
      // tokens equal to it. One scan in token order keeps the output ascending.
      scratch.assign(row, row + context);
      std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(),
                       std::greater<float>());
      const float threshold = scratch[k - 1];
      uint32_t above = 0;
      for (uint32_t a = 0; a < context; ++a) above += row[a] > threshold ? 1 : 0;
      uint32_t ties_left = k - above;
      for (uint32_t a = 0; a < context; ++a) {
        if (row[a] > threshold) {
          out[n++] = a;
        } else if (row[a] == threshold && ties_left > 0) {
          out[n++] = a;
          --ties_left;
        }
      }
    }
    for (uint32_t a = context; a < split.num_tokens; ++a) out[n++] = a;
  }
}

void SelectSinksRecent(uint32_t num_heads, const WindowSplit& split, uint32_t k, uint32_t sinks,
                       std::vector<uint32_t>* kept) {
  const uint32_t per_head = k + split.window;
  const uint32_t first = std::min(sinks, k);
  const uint32_t recent_begin = split.context - (k - first);
  std::vector<uint32_t> row;
  row.reserve(per_head);
  for (uint32_t a = 0; a < first; ++a) row.push_back(a);
  for (uint32_t a = recent_begin; a < split.num_tokens; ++a) row.push_back(a);
  kept->clear();
  kept->reserve(static_cast<size_t>(num_heads) * per_head);
  for (uint32_t head = 0; head < num_heads; ++head)
    kept->insert(kept->end(), row.begin(), row.end());
}

void SelectAll(uint32_t num_heads, uint32_t num_tokens, std::vector<uint32_t>* kept) {
  kept->resize(static_cast<size_t>(num_heads) * num_tokens);
  for (uint32_t head = 0; head < num_heads; ++head) {
    for (uint32_t a = 0; a < num_tokens; ++a)
      (*kept)[static_cast<size_t>(head) * num_tokens + a] = a;
  }
}

}  // namespace cachemgr::compress
