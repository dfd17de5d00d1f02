#include "cachemgr/compress/compress.h"

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cachemgr/compress/accounting.h"
#include "cachemgr/compress/budget.h"
#include "cachemgr/compress/codebook_graph.h"
#include "cachemgr/compress/rope.h"
#include "cachemgr/compress/scoring.h"
#include "cachemgr/compress/selection.h"
#include "tests/cachemgr/compress/test_sequence.h"

namespace cachemgr::compress {
namespace {

PolicyConfig Preset(const std::string& name, uint32_t window = 8) {
  absl::StatusOr<PolicyConfig> policy = PresetPolicy(name);
  REQUIRE(policy.ok());
  policy->window = window;
  return *policy;
}

CompressTarget Reserve(double r) { return {TargetKind::kReserveRatio, r}; }
CompressTarget Bytes(double r) { return {TargetKind::kByteRatio, r}; }

void CheckWellFormed(const Sequence& s, const SequenceResult& result, uint32_t window) {
  REQUIRE(result.layers.size() == s.shape.num_layers);
  uint64_t held = 0;
  double eq15 = 0.0;
  for (const LayerResult& layer : result.layers) {
    REQUIRE(layer.kept.size() == static_cast<size_t>(s.shape.num_kv_heads) * layer.kept_per_head);
    for (uint32_t h = 0; h < s.shape.num_kv_heads; ++h) {
      auto begin = layer.kept.begin() + static_cast<size_t>(h) * layer.kept_per_head;
      auto end = begin + layer.kept_per_head;
      CHECK(std::is_sorted(begin, end));
      CHECK(std::adjacent_find(begin, end) == end);
      // The window is always the tail.
      const uint32_t w = std::min(window, s.input.num_tokens);
      for (uint32_t i = 0; i < w; ++i) CHECK(*(end - 1 - i) == s.input.num_tokens - 1 - i);
    }
    CHECK(layer.bytes_held == LayerBytes(s.shape, layer));
    held += layer.bytes_held;
    eq15 += layer.eq15_ratio;
  }
  CHECK(result.stats.full_bytes == FullKvBytes(s.shape, s.input.num_tokens));
  CHECK(result.stats.held_bytes == held);
  CHECK(result.stats.honest_ratio == Approx(static_cast<double>(held) / result.stats.full_bytes));
  CHECK(result.stats.eq15_ratio == Approx(eq15 / s.shape.num_layers));
}

std::string Message(const absl::Status& status) { return std::string(status.message()); }

TEST_CASE("FullKV keeps everything", "[cpu]") {
  const Sequence s = MakeSequence(Shape(), 50, 0, 1);
  auto result = CompressSequence(s.shape, Preset("fullkv"), s.input, Reserve(0.2));
  REQUIRE(result.ok());
  CheckWellFormed(s, *result, 8);
  for (const LayerResult& layer : result->layers) {
    CHECK(layer.kept_per_head == 50);
    CHECK(!layer.key_codebook.has_value());
  }
  CHECK(result->stats.honest_ratio == 1.0);
  CHECK(result->stats.eq15_ratio == 1.0);
}

TEST_CASE("SnapKV: uniform budget, ranked per query head under repeat", "[cpu]") {
  const Sequence s = MakeSequence(Shape(), 200, 8, 2);
  // r_c = (0.5 * 200 - 8) / 192 = 0.4791..; k = floor(92) = 92; kept 100 per head.
  auto result = CompressSequence(s.shape, Preset("snapkv"), s.input, Reserve(0.5));
  REQUIRE(result.ok());
  CheckWellFormed(s, *result, 8);
  for (const LayerResult& layer : result->layers) {
    CHECK(layer.kept_per_head == 100);
    CHECK(layer.context_ratio == Approx(92.0 / 192.0));
    CHECK(layer.eq15_ratio == Approx(0.5));
  }
  // Repeat merges the query heads' rankings into the KV head's budget: the bytes of r.
  CHECK(result->stats.honest_ratio == Approx(0.5));
  CHECK(result->stats.reserve_ratio == 0.5);

  PolicyConfig mean = Preset("snapkv");
  mean.gqa = GqaMode::kGroupMean;
  auto grouped = CompressSequence(s.shape, mean, s.input, Reserve(0.5));
  REQUIRE(grouped.ok());
  CHECK(grouped->stats.honest_ratio == Approx(0.5));
  // Same budget, different choice (random queries disagree across a group).
  CHECK(grouped->layers[0].kept != result->layers[0].kept);
}

TEST_CASE("precomputed scores select like the queries they came from", "[cpu]") {
  const Sequence s = MakeSequence(Shape(), 120, 8, 3);
  PolicyConfig policy = Preset("pyramidkv");
  auto from_queries = CompressSequence(s.shape, policy, s.input, Reserve(0.3));
  REQUIRE(from_queries.ok());
  SequenceInput precomputed = s.input;
  std::vector<std::vector<float>> sums(s.shape.num_layers);
  for (uint32_t l = 0; l < s.shape.num_layers; ++l) {
    AttentionColumnSums(s.shape, 120, s.keys[l].data(), s.queries[l].data(), 8, &sums[l]);
    precomputed.layers[l].queries = nullptr;
    precomputed.layers[l].num_queries = 0;
    precomputed.layers[l].scores = sums[l].data();
  }
  auto from_scores = CompressSequence(s.shape, policy, precomputed, Reserve(0.3));
  REQUIRE(from_scores.ok());
  // Without a codebook, scores are all a policy reads: K and V may be absent (the daemon sends
  // none when the pool computed the scores).
  for (LayerInput& layer : precomputed.layers) layer.keys = layer.values = nullptr;
  auto scores_only = CompressSequence(s.shape, policy, precomputed, Bytes(0.3));
  REQUIRE(scores_only.ok());
  auto scores_with_kv = CompressSequence(s.shape, policy, s.input, Bytes(0.3));
  REQUIRE(scores_with_kv.ok());
  for (uint32_t l = 0; l < s.shape.num_layers; ++l) {
    CHECK(from_scores->layers[l].kept == from_queries->layers[l].kept);
    CHECK(scores_only->layers[l].kept == scores_with_kv->layers[l].kept);
  }
}

TEST_CASE("pyramid layers follow eq. 5-7", "[cpu]") {
  const Sequence s = MakeSequence(Shape(4), 264, 8, 4);  // l_c = 256
  auto result = CompressSequence(s.shape, Preset("pyramidinfer"), s.input, Reserve(0.3));
  REQUIRE(result.ok());
  CheckWellFormed(s, *result, 8);
  const double rc = (0.3 * 264 - 8) / 256;
  const std::vector<double> ratios = PyramidContextRatios(rc, 4, 0.05);
  for (uint32_t l = 0; l < 4; ++l) {
    CHECK(result->layers[l].context_ratio == Approx(ratios[l]));
    CHECK(result->layers[l].kept_per_head == KeptContextCount(ratios[l], 256) + 8);
  }
  CHECK(result->layers[0].kept_per_head > result->layers[3].kept_per_head);
}

TEST_CASE("StreamingLLM and H2O", "[cpu]") {
  const Sequence s = MakeSequence(Shape(2), 100, 0, 5);
  // r_c = (0.3 * 100 - 8) / 92 -> k = 22: sinks 0..3, recent 74..91, window 92..99.
  auto streaming = CompressSequence(s.shape, Preset("streamingllm"), s.input, Reserve(0.3));
  REQUIRE(streaming.ok());
  std::vector<uint32_t> want = {0, 1, 2, 3};
  for (uint32_t t = 74; t < 100; ++t) want.push_back(t);
  for (const LayerResult& layer : streaming->layers) {
    CHECK(std::vector<uint32_t>(layer.kept.begin(), layer.kept.begin() + 30) == want);
  }

  // H2O over every position's query.
  const Sequence h = MakeSequence(Shape(2), 100, 100, 6);
  auto h2o = CompressSequence(h.shape, Preset("h2o"), h.input, Reserve(0.3));
  REQUIRE(h2o.ok());
  CheckWellFormed(h, *h2o, 8);
  CHECK(h2o->layers[0].kept_per_head == 30);
}

TEST_CASE("ZigZag spends the average budget across layers", "[cpu]") {
  const Sequence s = MakeSequence(Shape(4), 300, 8, 7);
  auto result = CompressSequence(s.shape, Preset("zigzagkv"), s.input, Reserve(0.4));
  REQUIRE(result.ok());
  CheckWellFormed(s, *result, 8);
  const double avg = (0.4 * 300 - 8);  // B_avg = r_c * l_c
  double total = 0;
  for (const LayerResult& layer : result->layers) total += layer.kept_per_head - 8;
  CHECK(total <= 4 * avg + 1e-9);
  CHECK(total >= 4 * avg - 4);  // each layer floors once
}

TEST_CASE("codebook on pre-RoPE keys, and materialization re-applies RoPE", "[cpu]") {
  // Exact clusters (no noise): 6 key and 6 value directions per layer.
  const Sequence s = MakeSequence(Shape(2), 160, 8, 8, /*clusters=*/6, 0.0f, 1000);
  auto result = CompressSequence(s.shape, Preset("spindlekv"), s.input, Reserve(0.5));
  REQUIRE(result.ok());
  CheckWellFormed(s, *result, 8);
  for (uint32_t l = 0; l < 2; ++l) {
    const LayerResult& layer = result->layers[l];
    REQUIRE(layer.key_codebook.has_value());
    REQUIRE(layer.value_codebook.has_value());
    // Only possible if K was un-rotated: post-RoPE vectors of one cluster point everywhere.
    CHECK(layer.key_codebook->size() <= 6);
    CHECK(layer.value_codebook->size() <= 6);
    CHECK(layer.key_entry_offsets == std::vector<uint32_t>{0, layer.key_codebook->size()});
    CHECK(layer.bytes_held < PlainLayerBytes(s.shape, layer.kept_per_head));

    std::vector<float> keys, values;
    REQUIRE(MaterializeLayer(s.shape, s.input, l, layer, &keys, &values).ok());
    const uint32_t d = 16;
    REQUIRE(keys.size() == layer.kept.size() * d);
    for (size_t v = 0; v < layer.kept.size(); ++v) {
      const uint32_t token = layer.kept[v];
      const uint32_t kv = static_cast<uint32_t>(v / layer.kept_per_head);
      for (uint32_t i = 0; i < d; ++i) {
        const size_t src = (static_cast<size_t>(token) * 2 + kv) * d + i;
        CHECK(keys[v * d + i] == Approx(s.keys[l][src]).margin(2e-4));
        CHECK(values[v * d + i] == Approx(s.values[l][src]).margin(2e-4));
      }
    }
  }
  CHECK(result->stats.honest_ratio < 0.2);
  CHECK(result->stats.eq15_ratio < 0.2);
}

TEST_CASE("codebook scope per KV head and the only-if-smaller rule", "[cpu]") {
  const Sequence clustered = MakeSequence(Shape(2), 120, 8, 9, 5, 0.0f);
  PolicyConfig policy = Preset("spindlekv");
  policy.codebook_scope = CodebookScope::kKvHead;
  auto per_head = CompressSequence(clustered.shape, policy, clustered.input, Reserve(0.6));
  REQUIRE(per_head.ok());
  for (const LayerResult& layer : per_head->layers) {
    REQUIRE(layer.key_codebook.has_value());
    REQUIRE(layer.key_entry_offsets.size() == 3);  // 2 KV heads
    CHECK(layer.key_entry_offsets.back() == layer.key_codebook->size());
    CHECK(layer.key_entry_offsets[1] <= 5);
    std::vector<float> keys, values;
    REQUIRE(MaterializeLayer(clustered.shape, clustered.input, 0, layer, &keys, &values).ok());
  }

  // Gaussian vectors barely merge: the codebook would cost more, so the layer stays plain...
  const Sequence gaussian = MakeSequence(Shape(2), 120, 8, 10);
  PolicyConfig plain_policy = Preset("spindlekv");
  plain_policy.gqa = GqaMode::kGroupMean;
  auto plain = CompressSequence(gaussian.shape, plain_policy, gaussian.input, Reserve(0.6));
  REQUIRE(plain.ok());
  for (const LayerResult& layer : plain->layers) CHECK(!layer.key_codebook.has_value());
  // ... unless asked to keep it anyway.
  plain_policy.codebook_only_if_smaller = false;
  auto forced = CompressSequence(gaussian.shape, plain_policy, gaussian.input, Reserve(0.6));
  REQUIRE(forced.ok());
  for (const LayerResult& layer : forced->layers) CHECK(layer.key_codebook.has_value());
  CHECK(forced->stats.held_bytes > plain->stats.held_bytes);
}

TEST_CASE("materializing a plain layer gathers the kept vectors", "[cpu]") {
  const Sequence s = MakeSequence(Shape(1), 64, 8, 11);
  auto result = CompressSequence(s.shape, Preset("snapkv"), s.input, Reserve(0.4));
  REQUIRE(result.ok());
  const LayerResult& layer = result->layers[0];
  std::vector<float> keys, values;
  REQUIRE(MaterializeLayer(s.shape, s.input, 0, layer, &keys, &values).ok());
  for (size_t v = 0; v < layer.kept.size(); ++v) {
    const uint32_t kv = static_cast<uint32_t>(v / layer.kept_per_head);
    const size_t src = (static_cast<size_t>(layer.kept[v]) * 2 + kv) * 16;
    CHECK(std::equal(keys.begin() + v * 16, keys.begin() + (v + 1) * 16, s.keys[0].begin() + src));
    CHECK(std::equal(values.begin() + v * 16, values.begin() + (v + 1) * 16,
                     s.values[0].begin() + src));
  }
  LayerResult broken = layer;
  broken.kept.pop_back();
  CHECK(MaterializeLayer(s.shape, s.input, 0, broken, &keys, &values).code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(MaterializeLayer(s.shape, s.input, 1, layer, &keys, &values).code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE("byte-ratio targets are met within 1%", "[cpu]") {
  const Sequence s = MakeSequence(Shape(4), 512, 16, 12);
  const Sequence clustered = MakeSequence(Shape(4), 512, 16, 13, 24, 0.02f);
  struct Case {
    std::string preset;
    GqaMode gqa;
    const Sequence* sequence;
  };
  for (const Case& c :
       {Case{"snapkv", GqaMode::kGroupMean, &s}, Case{"pyramidkv", GqaMode::kRepeat, &s},
        Case{"zigzagkv", GqaMode::kRepeat, &s}, Case{"spindlekv", GqaMode::kRepeat, &clustered},
        Case{"spindlekv", GqaMode::kGroupMean, &clustered}}) {
    PolicyConfig policy = Preset(c.preset, 16);
    policy.gqa = c.gqa;
    // Reachable range: [window only, r = 1].
    auto low = CompressSequence(c.sequence->shape, policy, c.sequence->input, Reserve(1e-9));
    auto high = CompressSequence(c.sequence->shape, policy, c.sequence->input, Reserve(1.0));
    REQUIRE(low.ok());
    REQUIRE(high.ok());
    for (double target : {0.08, 0.15, 0.3, 0.5, 0.8}) {
      if (target < low->stats.honest_ratio * 1.01 || target > high->stats.honest_ratio * 0.99) {
        continue;
      }
      INFO(c.preset << " gqa " << static_cast<int>(c.gqa) << " target " << target);
      auto result = CompressSequence(c.sequence->shape, policy, c.sequence->input, Bytes(target));
      INFO(result.status().ToString());
      REQUIRE(result.ok());
      CHECK(std::abs(result->stats.honest_ratio / target - 1.0) <= 0.01);
      CHECK(result->stats.reserve_ratio > 0.0);
      CHECK(result->stats.reserve_ratio <= 1.0);
      CheckWellFormed(*c.sequence, *result, 16);
    }
  }
}

TEST_CASE("short sequences meet byte targets by mixing neighbouring layer budgets", "[cpu]") {
  // Uniform budgets on 256 tokens: one token in every layer is 0.4% of the bytes, wider than
  // the 1% band around 0.1; giving the extra token to only some layers fills the gap.
  const Sequence s = MakeSequence(Shape(6, 2, 2), 256, 8, 18);
  PolicyConfig policy = Preset("snapkv", 8);
  for (double target : {0.1, 0.1234, 0.2345, 0.377}) {
    INFO("target " << target);
    auto result = CompressSequence(s.shape, policy, s.input, Bytes(target));
    INFO(result.status().ToString());
    REQUIRE(result.ok());
    CHECK(std::abs(result->stats.honest_ratio / target - 1.0) <= 0.01);
    CheckWellFormed(s, *result, 8);
    uint32_t lo = 1u << 30, hi = 0;
    for (const LayerResult& layer : result->layers) {
      lo = std::min(lo, layer.kept_per_head);
      hi = std::max(hi, layer.kept_per_head);
    }
    CHECK(hi - lo <= 1);
  }
}

TEST_CASE("unreachable byte targets are OUT_OF_RANGE naming target.value", "[cpu]") {
  const Sequence s = MakeSequence(Shape(2), 64, 8, 14);
  PolicyConfig policy = Preset("snapkv", 32);
  policy.gqa = GqaMode::kGroupMean;
  // The window alone is half the tokens.
  auto low = CompressSequence(s.shape, policy, s.input, Bytes(0.2));
  CHECK(low.status().code() == absl::StatusCode::kOutOfRange);
  CHECK(Message(low.status()).rfind("target.value 0.2", 0) == 0);
  CHECK(Message(low.status()).find("[0.5, 1]") != std::string::npos);
  auto half = CompressSequence(s.shape, policy, s.input, Bytes(0.5));
  REQUIRE(half.ok());
  CHECK(half->stats.honest_ratio == Approx(0.5));

  // A codebook keeps even r = 1 far below full.
  const Sequence clustered = MakeSequence(Shape(2), 64, 8, 15, 3, 0.0f);
  auto high = CompressSequence(clustered.shape, Preset("codebook"), clustered.input, Bytes(1.0));
  CHECK(high.status().code() == absl::StatusCode::kOutOfRange);
  CHECK(Message(high.status()).rfind("target.value 1", 0) == 0);
}

TEST_CASE("validation names the field", "[cpu]") {
  const Sequence s = MakeSequence(Shape(2), 40, 8, 16);
  const PolicyConfig policy = Preset("spindlekv");
  auto error = [&](const ModelShape& shape, const PolicyConfig& p, const SequenceInput& input,
                   const CompressTarget& target) {
    auto result = CompressSequence(shape, p, input, target);
    CHECK(result.status().code() == absl::StatusCode::kInvalidArgument);
    return Message(result.status());
  };
  ModelShape shape = s.shape;
  shape.num_kv_heads = 3;
  CHECK(error(shape, policy, s.input, Reserve(0.5)).rfind("shape.num_q_heads", 0) == 0);
  shape = s.shape;
  shape.elem_bytes = 3;
  CHECK(error(shape, policy, s.input, Reserve(0.5)).rfind("shape.elem_bytes", 0) == 0);
  shape = s.shape;
  shape.rotary_dim = 7;
  CHECK(error(shape, policy, s.input, Reserve(0.5)).rfind("shape.rotary_dim", 0) == 0);
  CHECK(error(s.shape, policy, s.input, Reserve(0.0)) == "target.value must be in (0, 1] (got 0)");
  CHECK(error(s.shape, policy, s.input, Bytes(1.5)).rfind("target.value", 0) == 0);
  CHECK(error(s.shape, policy, s.input, Reserve(std::nan(""))).rfind("target.value", 0) == 0);
  PolicyConfig bad = policy;
  bad.theta_k = 1.5f;
  CHECK(error(s.shape, bad, s.input, Reserve(0.5)) == "policy.theta_k must be in (0, 1] (got 1.5)");

  SequenceInput input = s.input;
  input.layers.pop_back();
  CHECK(error(s.shape, policy, input, Reserve(0.5)).rfind("input.layers", 0) == 0);
  input = s.input;
  input.positions.pop_back();
  CHECK(error(s.shape, policy, input, Reserve(0.5)).rfind("input.positions", 0) == 0);
  input = s.input;
  input.positions.clear();  // empty means positions[t] = t
  CHECK(CompressSequence(s.shape, policy, input, Reserve(0.5)).ok());
  input = s.input;
  input.num_tokens = 0;
  CHECK(error(s.shape, policy, input, Reserve(0.5)).rfind("input.num_tokens", 0) == 0);
  input = s.input;
  input.layers[1].queries = nullptr;
  CHECK(error(s.shape, policy, input, Reserve(0.5)).rfind("input.layers[1].queries", 0) == 0);
  CHECK(CompressSequence(s.shape, Preset("streamingllm"), input, Reserve(0.5)).ok());
  input = s.input;
  input.layers[0].num_queries = 41;
  CHECK(error(s.shape, policy, input, Reserve(0.5)).rfind("input.layers[0].num_queries", 0) == 0);
  input = s.input;
  input.layers[0].values = nullptr;
  CHECK(error(s.shape, policy, input, Reserve(0.5)).rfind("input.layers[0].values", 0) == 0);
  // Keys are read by the codebook and by scoring from queries; values by the codebook only.
  CHECK(CompressSequence(s.shape, Preset("snapkv"), input, Reserve(0.5)).ok());
  input = s.input;
  input.layers[1].keys = nullptr;
  CHECK(error(s.shape, policy, input, Reserve(0.5)).rfind("input.layers[1].keys", 0) == 0);
  CHECK(error(s.shape, Preset("snapkv"), input, Reserve(0.5)).rfind("input.layers[1].keys", 0) ==
        0);
  CHECK(CompressSequence(s.shape, Preset("streamingllm"), input, Reserve(0.5)).ok());
}

TEST_CASE("a sequence no longer than the window is kept whole", "[cpu]") {
  const Sequence s = MakeSequence(Shape(2), 6, 6, 17);
  auto result = CompressSequence(s.shape, Preset("pyramidkv"), s.input, Reserve(0.1));
  REQUIRE(result.ok());
  for (const LayerResult& layer : result->layers) CHECK(layer.kept_per_head == 6);
  auto zigzag = CompressSequence(s.shape, Preset("zigzagkv"), s.input, Reserve(0.1));
  REQUIRE(zigzag.ok());
  for (const LayerResult& layer : zigzag->layers) CHECK(layer.kept_per_head == 6);
  // Every r keeps everything: only a byte ratio of 1 is reachable.
  auto whole = CompressSequence(s.shape, Preset("snapkv"), s.input, Bytes(1.0));
  REQUIRE(whole.ok());
  CHECK(whole->stats.honest_ratio == 1.0);
  auto bytes = CompressSequence(s.shape, Preset("snapkv"), s.input, Bytes(0.5));
  CHECK(bytes.status().code() == absl::StatusCode::kOutOfRange);
}

}  // namespace
}  // namespace cachemgr::compress

namespace cachemgr::compress {
namespace {

TEST_CASE("layers on several threads give the same result as on one", "[cpu]") {
  const Sequence s = MakeSequence(Shape(6, 4, 2, 16), 150, 8, 23, /*clusters=*/4, 0.01f);
  for (const std::string name : {"spindlekv", "zigzagkv", "h2o"}) {
    INFO(name);
    PolicyConfig policy = *PresetPolicy(name);
    policy.window = 8;
    for (const CompressTarget target : {CompressTarget{TargetKind::kReserveRatio, 0.4},
                                        CompressTarget{TargetKind::kByteRatio, 0.1}}) {
      auto one = CompressSequence(s.shape, policy, s.input, target, 1);
      auto many = CompressSequence(s.shape, policy, s.input, target, 4);
      auto all = CompressSequence(s.shape, policy, s.input, target, 0);
      INFO(one.status().message());
      REQUIRE(one.ok());
      REQUIRE(many.ok());
      REQUIRE(all.ok());
      CHECK(one->stats.held_bytes == many->stats.held_bytes);
      CHECK(one->stats.held_bytes == all->stats.held_bytes);
      for (size_t l = 0; l < one->layers.size(); ++l) {
        CHECK(one->layers[l].kept == many->layers[l].kept);
        CHECK(one->layers[l].key_codebook.has_value() == many->layers[l].key_codebook.has_value());
        if (one->layers[l].key_codebook.has_value()) {
          CHECK(one->layers[l].key_codebook->refs == many->layers[l].key_codebook->refs);
        }
      }
    }
  }
}

}  // namespace
}  // namespace cachemgr::compress

namespace cachemgr::compress {
namespace {

// Delegates to the host pass and counts the graphs; fails every build when told to.
class RecordingGraph final : public SimilarityGraphBuilder {
 public:
  explicit RecordingGraph(bool fail = false) : fail_(fail) {}
  absl::Status Build(const float* unit, const uint8_t* nonzero, size_t n, uint32_t dim, float theta,
                     uint64_t* adjacency) const override {
    ++calls_;
    vectors_ += n;
    if (fail_) return absl::ResourceExhaustedError("device out of memory");
    SimilarityAdjacency(unit, nonzero, n, dim, theta, adjacency);
    return absl::OkStatus();
  }
  int calls() const { return calls_.load(); }
  uint64_t vectors() const { return vectors_.load(); }

 private:
  const bool fail_;
  mutable std::atomic<int> calls_{0};
  mutable std::atomic<uint64_t> vectors_{0};
};

TEST_CASE("a similarity graph builder takes every codebook graph and changes nothing", "[cpu]") {
  const Sequence s = MakeSequence(Shape(4, 4, 2, 16), 150, 8, 29, /*clusters=*/4, 0.01f);
  PolicyConfig policy = Preset("spindlekv");
  policy.codebook_only_if_smaller = false;
  auto host = CompressSequence(s.shape, policy, s.input, Reserve(0.5), 2);
  REQUIRE(host.ok());
  RecordingGraph graph;
  auto hooked = CompressSequence(s.shape, policy, s.input, Reserve(0.5), ComputeOptions{2, &graph});
  REQUIRE(hooked.ok());
  // One graph per layer for K and one for V (scope kLayer), over every kept vector.
  CHECK(graph.calls() == 2 * static_cast<int>(s.shape.num_layers));
  uint64_t kept_vectors = 0;
  for (const LayerResult& layer : host->layers) kept_vectors += layer.kept.size();
  CHECK(graph.vectors() == 2 * kept_vectors);
  for (size_t l = 0; l < host->layers.size(); ++l) {
    REQUIRE(hooked->layers[l].key_codebook.has_value());
    CHECK(hooked->layers[l].key_codebook->refs == host->layers[l].key_codebook->refs);
    CHECK(hooked->layers[l].key_codebook->entries == host->layers[l].key_codebook->entries);
    CHECK(hooked->layers[l].value_codebook->refs == host->layers[l].value_codebook->refs);
  }

  // A ranker sees one call per layer and selection of a GQA-repeat policy, same result.
  class CountingRanker final : public TopKRanker {
   public:
    absl::Status Rank(absl::Span<const float> scores, uint32_t num_rows, uint32_t context,
                      uint32_t k, uint32_t* ranked) const override {
      ++calls;
      std::vector<uint32_t> row;
      for (uint32_t r = 0; r < num_rows; ++r) {
        RankTopK(scores.subspan(size_t{r} * context, context), k, &row);
        std::copy(row.begin(), row.end(), ranked + size_t{r} * k);
      }
      return absl::OkStatus();
    }
    mutable std::atomic<int> calls{0};
  } ranker;
  auto ranked =
      CompressSequence(s.shape, policy, s.input, Reserve(0.5), ComputeOptions{2, nullptr, &ranker});
  REQUIRE(ranked.ok());
  CHECK(ranker.calls.load() == static_cast<int>(s.shape.num_layers));
  for (size_t l = 0; l < host->layers.size(); ++l) {
    CHECK(ranked->layers[l].kept == host->layers[l].kept);
  }

  // A policy without a codebook never asks for a graph.
  RecordingGraph unused;
  REQUIRE(
      CompressSequence(s.shape, Preset("snapkv"), s.input, Reserve(0.5), ComputeOptions{1, &unused})
          .ok());
  CHECK(unused.calls() == 0);

  // The builder's error passes through, code and message.
  RecordingGraph failing(/*fail=*/true);
  auto failed =
      CompressSequence(s.shape, policy, s.input, Reserve(0.5), ComputeOptions{1, &failing});
  CHECK(failed.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(Message(failed.status()) == "device out of memory");
}

}  // namespace
}  // namespace cachemgr::compress
