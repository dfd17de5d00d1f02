#include "cachemgr/compress/selection.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace cachemgr::compress {
namespace {

std::vector<uint32_t> Row(const std::vector<uint32_t>& kept, uint32_t per_head, uint32_t head) {
  return std::vector<uint32_t>(kept.begin() + head * per_head,
                               kept.begin() + (head + 1) * per_head);
}

TEST_CASE("top-k: ties go to the lower index, window always kept, ascending", "[cpu]") {
  const std::vector<float> scores = {1, 3, 3, 2, 3};  // context of 5, window of 2
  const WindowSplit split = SplitWindow(7, 2);
  std::vector<uint32_t> kept;
  SelectTopK(scores, 1, split, 2, &kept);
  CHECK(kept == std::vector<uint32_t>{1, 2, 5, 6});
  SelectTopK(scores, 1, split, 3, &kept);
  CHECK(kept == std::vector<uint32_t>{1, 2, 4, 5, 6});
  SelectTopK(scores, 1, split, 4, &kept);
  CHECK(kept == std::vector<uint32_t>{1, 2, 3, 4, 5, 6});
  SelectTopK(scores, 1, split, 0, &kept);
  CHECK(kept == std::vector<uint32_t>{5, 6});
  SelectTopK(scores, 1, split, 5, &kept);
  CHECK(kept == std::vector<uint32_t>{0, 1, 2, 3, 4, 5, 6});
}

TEST_CASE("top-k per head, equal counts; -inf loses to any finite score", "[cpu]") {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> scores = {
      -inf, 0, -5,   4,  // head 0
      9,    8, -inf, 7,  // head 1
  };
  std::vector<uint32_t> kept;
  SelectTopK(scores, 2, SplitWindow(5, 1), 3, &kept);
  REQUIRE(kept.size() == 2 * 4);
  CHECK(Row(kept, 4, 0) == std::vector<uint32_t>{1, 2, 3, 4});
  CHECK(Row(kept, 4, 1) == std::vector<uint32_t>{0, 1, 3, 4});
}

TEST_CASE("top-k matches a sort-based reference", "[cpu]") {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 40; ++trial) {
    const uint32_t context = 1 + rng() % 500;
    const uint32_t window = rng() % 40;
    const uint32_t heads = 1 + rng() % 4;
    std::vector<float> scores(static_cast<size_t>(heads) * context);
    for (float& s : scores) s = static_cast<float>(rng() % 50);  // many ties
    const uint32_t k = rng() % (context + 1);
    const WindowSplit split = SplitWindow(context + window, window);
    std::vector<uint32_t> kept;
    SelectTopK(scores, heads, split, k, &kept);
    REQUIRE(kept.size() == static_cast<size_t>(heads) * (k + split.window));
    for (uint32_t h = 0; h < heads; ++h) {
      std::vector<uint32_t> order(context);
      std::iota(order.begin(), order.end(), 0);
      const float* row = scores.data() + static_cast<size_t>(h) * context;
      std::stable_sort(order.begin(), order.end(),
                       [row](uint32_t a, uint32_t b) { return row[a] > row[b]; });
      std::vector<uint32_t> want(order.begin(), order.begin() + k);
      std::sort(want.begin(), want.end());
      for (uint32_t a = context; a < context + window; ++a) want.push_back(a);
      INFO("trial " << trial << " head " << h);
      CHECK(Row(kept, k + split.window, h) == want);
    }
  }
}

TEST_CASE("StreamingLLM keeps sinks and the most recent tokens", "[cpu]") {
  const WindowSplit split = SplitWindow(20, 4);  // context 16, window 16..19
  std::vector<uint32_t> kept;
  SelectSinksRecent(2, split, 6, 4, &kept);
  const std::vector<uint32_t> want = {0, 1, 2, 3, 14, 15, 16, 17, 18, 19};
  CHECK(Row(kept, 10, 0) == want);
  CHECK(Row(kept, 10, 1) == want);
  SelectSinksRecent(1, split, 2, 4, &kept);  // budget below the sink count
  CHECK(kept == std::vector<uint32_t>{0, 1, 16, 17, 18, 19});
  SelectSinksRecent(1, split, 0, 4, &kept);
  CHECK(kept == std::vector<uint32_t>{16, 17, 18, 19});
  SelectSinksRecent(1, split, 16, 4, &kept);
  CHECK(kept.size() == 20);
  CHECK(std::is_sorted(kept.begin(), kept.end()));
  SelectSinksRecent(1, SplitWindow(10, 0), 3, 0, &kept);  // no sinks, no window
  CHECK(kept == std::vector<uint32_t>{7, 8, 9});
}

TEST_CASE("select all, selection heads and their KV heads", "[cpu]") {
  std::vector<uint32_t> kept;
  SelectAll(2, 3, &kept);
  CHECK(kept == std::vector<uint32_t>{0, 1, 2, 0, 1, 2});

  ModelShape shape;
  shape.num_q_heads = 8;
  shape.num_kv_heads = 2;
  PolicyConfig policy;
  policy.schedule = BudgetSchedule::kPyramid;
  policy.scoring = Scoring::kWindow;
  policy.gqa = GqaMode::kRepeat;
  CHECK(NumSelectionHeads(shape, policy) == 8);
  policy.gqa = GqaMode::kGroupMean;
  CHECK(NumSelectionHeads(shape, policy) == 2);
  policy.gqa = GqaMode::kRepeat;
  policy.scoring = Scoring::kSinksRecent;
  CHECK(NumSelectionHeads(shape, policy) == 2);
  policy.scoring = Scoring::kWindow;
  policy.schedule = BudgetSchedule::kFull;
  CHECK(NumSelectionHeads(shape, policy) == 2);

  CHECK(KvHeadOfSelectionHead(0, 8, 2) == 0);
  CHECK(KvHeadOfSelectionHead(3, 8, 2) == 0);
  CHECK(KvHeadOfSelectionHead(4, 8, 2) == 1);
  CHECK(KvHeadOfSelectionHead(7, 8, 2) == 1);
  CHECK(KvHeadOfSelectionHead(1, 2, 2) == 1);
}

}  // namespace
}  // namespace cachemgr::compress
