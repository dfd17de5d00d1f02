#include "cachemgr/compress/selection.h"

#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <iterator>
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
  REQUIRE(SelectTopK(scores, 1, 1, split, 2, &kept).ok());
  CHECK(kept == std::vector<uint32_t>{1, 2, 5, 6});
  REQUIRE(SelectTopK(scores, 1, 1, split, 3, &kept).ok());
  CHECK(kept == std::vector<uint32_t>{1, 2, 4, 5, 6});
  REQUIRE(SelectTopK(scores, 1, 1, split, 4, &kept).ok());
  CHECK(kept == std::vector<uint32_t>{1, 2, 3, 4, 5, 6});
  REQUIRE(SelectTopK(scores, 1, 1, split, 0, &kept).ok());
  CHECK(kept == std::vector<uint32_t>{5, 6});
  REQUIRE(SelectTopK(scores, 1, 1, split, 5, &kept).ok());
  CHECK(kept == std::vector<uint32_t>{0, 1, 2, 3, 4, 5, 6});
}

TEST_CASE("top-k per head, equal counts; -inf loses to any finite score", "[cpu]") {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> scores = {
      -inf, 0, -5,   4,  // head 0
      9,    8, -inf, 7,  // head 1
  };
  std::vector<uint32_t> kept;
  REQUIRE(SelectTopK(scores, 2, 2, SplitWindow(5, 1), 3, &kept).ok());
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
    REQUIRE(SelectTopK(scores, heads, heads, split, k, &kept).ok());
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

TEST_CASE("select all", "[cpu]") {
  std::vector<uint32_t> kept;
  SelectAll(2, 3, &kept);
  CHECK(kept == std::vector<uint32_t>{0, 1, 2, 0, 1, 2});
}

TEST_CASE("repeat: a KV head takes its query heads' rankings round-robin", "[cpu]") {
  // 2 KV heads, 2 query heads each, context 6, window 1.
  const std::vector<float> scores = {
      9, 8, 7, 0, 0, 0,  // q0 (kv 0): ranks 0, 1, 2
      9, 0, 0, 8, 0, 7,  // q1 (kv 0): ranks 0, 3, 5
      0, 0, 0, 0, 5, 4,  // q2 (kv 1): ranks 4, 5, then ties 0, 1, ...
      0, 0, 0, 0, 4, 5,  // q3 (kv 1): ranks 5, 4, ...
  };
  const WindowSplit split = SplitWindow(7, 1);
  std::vector<uint32_t> kept;
  // kv 0, k = 3: rank 0 -> 0 (q0), 0 (q1, taken); rank 1 -> 1 (q0), 3 (q1).
  // kv 1, k = 3: rank 0 -> 4, 5; rank 1 -> 5, 4 (taken); rank 2 -> 0 (q2's first tie).
  REQUIRE(SelectTopK(scores, 4, 2, split, 3, &kept).ok());
  CHECK(Row(kept, 4, 0) == std::vector<uint32_t>{0, 1, 3, 6});
  CHECK(Row(kept, 4, 1) == std::vector<uint32_t>{0, 4, 5, 6});
  // k = 1 takes q0's (resp. q2's) best; k = 0 the window only; k = context everything.
  REQUIRE(SelectTopK(scores, 4, 2, split, 1, &kept).ok());
  CHECK(kept == std::vector<uint32_t>{0, 6, 4, 6});
  REQUIRE(SelectTopK(scores, 4, 2, split, 0, &kept).ok());
  CHECK(kept == std::vector<uint32_t>{6, 6});
  REQUIRE(SelectTopK(scores, 4, 2, split, 6, &kept).ok());
  CHECK(Row(kept, 7, 1) == std::vector<uint32_t>{0, 1, 2, 3, 4, 5, 6});
}

TEST_CASE("repeat round-robin matches a literal reference", "[cpu]") {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 40; ++trial) {
    const uint32_t context = 1 + rng() % 300;
    const uint32_t window = rng() % 8;
    const uint32_t kv_heads = 1 + rng() % 3;
    const uint32_t group = 2 + rng() % 3;
    std::vector<float> scores(static_cast<size_t>(kv_heads) * group * context);
    for (float& s : scores) s = static_cast<float>(rng() % 30);
    const uint32_t k = rng() % (context + 1);
    const WindowSplit split = SplitWindow(context + window, window);
    std::vector<uint32_t> kept;
    REQUIRE(SelectTopK(scores, kv_heads * group, kv_heads, split, k, &kept).ok());
    REQUIRE(kept.size() == static_cast<size_t>(kv_heads) * (k + split.window));
    for (uint32_t h = 0; h < kv_heads; ++h) {
      std::vector<std::vector<uint32_t>> ranking(group);
      for (uint32_t g = 0; g < group; ++g) {
        ranking[g].resize(context);
        std::iota(ranking[g].begin(), ranking[g].end(), 0);
        const float* row = scores.data() + (static_cast<size_t>(h) * group + g) * context;
        std::stable_sort(ranking[g].begin(), ranking[g].end(),
                         [row](uint32_t a, uint32_t b) { return row[a] > row[b]; });
      }
      std::vector<uint32_t> want;
      for (uint32_t rank = 0; rank < context && want.size() < k; ++rank) {
        for (uint32_t g = 0; g < group && want.size() < k; ++g) {
          const uint32_t t = ranking[g][rank];
          if (std::find(want.begin(), want.end(), t) == want.end()) want.push_back(t);
        }
      }
      std::sort(want.begin(), want.end());
      for (uint32_t a = context; a < context + window; ++a) want.push_back(a);
      INFO("trial " << trial << " head " << h);
      CHECK(Row(kept, k + split.window, h) == want);
    }
  }
}

// Delegates to RankTopK row by row and records the calls; fails when told to.
class RecordingRanker final : public TopKRanker {
 public:
  explicit RecordingRanker(bool fail = false) : fail_(fail) {}
  absl::Status Rank(absl::Span<const float> scores, uint32_t num_rows, uint32_t context, uint32_t k,
                    uint32_t* ranked) const override {
    calls.push_back({num_rows, context, k});
    if (fail_) return absl::InternalError("device lost");
    std::vector<uint32_t> row;
    for (uint32_t r = 0; r < num_rows; ++r) {
      RankTopK(scores.subspan(size_t{r} * context, context), k, &row);
      std::copy(row.begin(), row.end(), ranked + size_t{r} * k);
    }
    return absl::OkStatus();
  }
  mutable std::vector<std::array<uint32_t, 3>> calls;

 private:
  const bool fail_;
};

TEST_CASE("a ranker takes every query head of a layer in one call and changes nothing", "[cpu]") {
  std::mt19937 rng(13);
  for (int trial = 0; trial < 30; ++trial) {
    const uint32_t context = 2 + rng() % 200;
    const uint32_t kv_heads = 1 + rng() % 3;
    const uint32_t group = 2 + rng() % 3;
    std::vector<float> scores(size_t{kv_heads} * group * context);
    for (float& s : scores) s = static_cast<float>(rng() % 40);
    const uint32_t k = 1 + rng() % (context - 1);  // 0 < k < context: the ranked case
    const WindowSplit split = SplitWindow(context + 3, 3);
    std::vector<uint32_t> host, hooked;
    REQUIRE(SelectTopK(scores, kv_heads * group, kv_heads, split, k, &host).ok());
    RecordingRanker ranker;
    REQUIRE(SelectTopK(scores, kv_heads * group, kv_heads, split, k, &hooked, &ranker).ok());
    CHECK(hooked == host);
    REQUIRE(ranker.calls.size() == 1);
    CHECK(ranker.calls[0] == std::array<uint32_t, 3>{kv_heads * group, context, k});
  }
  // Nothing to rank: no call (no GQA group, a whole context, or k = 0).
  RecordingRanker unused;
  std::vector<float> scores(4 * 10, 1.0f);
  std::vector<uint32_t> kept;
  REQUIRE(SelectTopK(scores, 4, 4, SplitWindow(12, 2), 5, &kept, &unused).ok());
  REQUIRE(SelectTopK(scores, 4, 2, SplitWindow(12, 2), 10, &kept, &unused).ok());
  REQUIRE(SelectTopK(scores, 4, 2, SplitWindow(12, 2), 0, &kept, &unused).ok());
  CHECK(unused.calls.empty());
  RecordingRanker failing(/*fail=*/true);
  const absl::Status status = SelectTopK(scores, 4, 2, SplitWindow(12, 2), 5, &kept, &failing);
  CHECK(status.code() == absl::StatusCode::kInternal);
  CHECK(status.message() == "device lost");
}

TEST_CASE("RankTopK is the stable descending order: ties, signed zeros, infinities, NaN", "[cpu]") {
  std::mt19937 rng(12);
  const float specials[] = {0.0f,
                            -0.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::nanf(""),
                            -std::numeric_limits<float>::denorm_min(),
                            1e-30f,
                            -3.5f,
                            7.0f};
  for (int trial = 0; trial < 200; ++trial) {
    const uint32_t context = 1 + rng() % 500;
    std::vector<float> row(context);
    for (float& x : row) {
      const uint32_t pick = rng() % 4;
      x = pick == 0   ? specials[rng() % std::size(specials)]
          : pick == 1 ? static_cast<float>(static_cast<int>(rng() % 21) - 10)  // many ties
                      : std::ldexp(static_cast<float>(rng() % 100000) - 50000.0f, -7);
    }
    const uint32_t k = rng() % (context + 1);
    std::vector<uint32_t> got;
    RankTopK(row, k, &got);
    // Reference: NaN scores as -infinity, then a stable sort by descending score (-0 == +0).
    std::vector<float> clean = row;
    for (float& x : clean) {
      if (std::isnan(x)) x = -std::numeric_limits<float>::infinity();
    }
    std::vector<uint32_t> want(context);
    std::iota(want.begin(), want.end(), 0);
    std::stable_sort(want.begin(), want.end(),
                     [&](uint32_t a, uint32_t b) { return clean[a] > clean[b]; });
    want.resize(k);
    INFO("trial " << trial << " context " << context << " k " << k);
    CHECK(got == want);
  }
}

}  // namespace
}  // namespace cachemgr::compress
