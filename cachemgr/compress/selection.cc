#include "cachemgr/compress/selection.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>

namespace cachemgr::compress {
namespace {

// The k highest of `row` (ties to the lower index), ascending, into out[0, k). Threshold = the
// k-th largest score; everything above it and the lowest-indexed tokens equal to it, in one scan
// in token order.
void TopKAscending(const float* row, uint32_t context, uint32_t k, std::vector<float>& scratch,
                   uint32_t* out) {
  if (k == 0) return;
  if (k == context) {
    for (uint32_t a = 0; a < context; ++a) out[a] = a;
    return;
  }
  scratch.assign(row, row + context);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(),
                   std::greater<float>());
  const float threshold = scratch[k - 1];
  uint32_t above = 0;
  for (uint32_t a = 0; a < context; ++a) above += row[a] > threshold ? 1 : 0;
  uint32_t ties_left = k - above;
  uint32_t n = 0;
  for (uint32_t a = 0; a < context; ++a) {
    if (row[a] > threshold) {
      out[n++] = a;
    } else if (row[a] == threshold && ties_left > 0) {
      out[n++] = a;
      --ties_left;
    }
  }
}

// A score and its token as one integer whose ascending order is the ranking's: descending score
// (-0.0 as +0.0, NaN as -infinity, like RankTopKCuda), then ascending token. Sorting these
// plain 64-bit keys keeps the comparisons branch-free and the data contiguous.
uint64_t RankKey(float score, uint32_t token) {
  if (std::isnan(score)) score = -std::numeric_limits<float>::infinity();
  if (score == 0.0f) score = 0.0f;
  const uint32_t bits = std::bit_cast<uint32_t>(score);
  const uint32_t ascending = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
  return (uint64_t{~ascending} << 32) | token;
}

}  // namespace

void RankTopK(absl::Span<const float> row, uint32_t k, std::vector<uint32_t>* ranked) {
  const uint32_t context = static_cast<uint32_t>(row.size());
  std::vector<uint64_t> keys(context);
  for (uint32_t a = 0; a < context; ++a) keys[a] = RankKey(row[a], a);
  // The k smallest keys first (linear), then only those sorted.
  if (k < context) std::nth_element(keys.begin(), keys.begin() + k, keys.end());
  std::sort(keys.begin(), keys.begin() + k);
  ranked->resize(k);
  for (uint32_t i = 0; i < k; ++i) (*ranked)[i] = static_cast<uint32_t>(keys[i]);
}

void MergeRankings(absl::Span<const uint32_t> rankings, uint32_t group, uint32_t context,
                   uint32_t k, uint32_t* out) {
  std::vector<uint8_t> taken(context, 0);
  uint32_t n = 0;
  // Each ranking holds k distinct tokens, so the union reaches k before the ranks run out.
  for (uint32_t rank = 0; n < k; ++rank) {
    for (uint32_t g = 0; g < group && n < k; ++g) {
      const uint32_t token = rankings[static_cast<size_t>(g) * k + rank];
      if (!taken[token]) {
        taken[token] = 1;
        out[n++] = token;
      }
    }
  }
  std::sort(out, out + k);
}

absl::Status SelectTopK(absl::Span<const float> scores, uint32_t num_score_heads,
                        uint32_t num_kv_heads, const WindowSplit& split, uint32_t k,
                        std::vector<uint32_t>* kept, const TopKRanker* ranker) {
  const uint32_t context = split.context;
  const uint32_t per_head = k + split.window;
  const uint32_t group = num_score_heads / num_kv_heads;
  kept->resize(static_cast<size_t>(num_kv_heads) * per_head);
  const bool merge = group > 1 && k > 0 && k < context;
  // kRepeat: every query head's ranking, [num_score_heads, k], all rows at once.
  std::vector<uint32_t> rankings;
  if (merge) {
    rankings.resize(static_cast<size_t>(num_score_heads) * k);
    if (ranker != nullptr) {
      if (absl::Status s = ranker->Rank(scores, num_score_heads, context, k, rankings.data());
          !s.ok()) {
        return s;
      }
    } else {
      std::vector<uint32_t> ranked;
      for (uint32_t row = 0; row < num_score_heads; ++row) {
        RankTopK(scores.subspan(static_cast<size_t>(row) * context, context), k, &ranked);
        std::copy(ranked.begin(), ranked.end(), rankings.begin() + static_cast<size_t>(row) * k);
      }
    }
  }
  std::vector<float> scratch;
  for (uint32_t h = 0; h < num_kv_heads; ++h) {
    uint32_t* out = kept->data() + static_cast<size_t>(h) * per_head;
    if (merge) {
      MergeRankings(absl::MakeConstSpan(rankings).subspan(static_cast<size_t>(h) * group * k,
                                                          static_cast<size_t>(group) * k),
                    group, context, k, out);
    } else if (group == 1 || k == context) {
      TopKAscending(scores.data() + static_cast<size_t>(h) * context, context, k, scratch, out);
    }
    for (uint32_t a = context; a < split.num_tokens; ++a) out[k + (a - context)] = a;
  }
  return absl::OkStatus();
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
