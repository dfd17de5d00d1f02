// CompressSequence and MaterializeLayer: the stages of budget.h, scoring.h, selection.h,
// codebook_stage.h and accounting.h wired together, plus the byte-ratio search.
#include "cachemgr/compress/compress.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "cachemgr/compress/accounting.h"
#include "cachemgr/compress/budget.h"
#include "cachemgr/compress/codebook.h"
#include "cachemgr/compress/codebook_stage.h"
#include "cachemgr/compress/rope.h"
#include "cachemgr/compress/scoring.h"
#include "cachemgr/compress/selection.h"
#include "cachemgr/compress/validation.h"
#include "cachemgr/util/parallel_for.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr::compress {
namespace {

// Most evaluations of the byte-ratio search (two endpoints included).
constexpr int kMaxSearchEvaluations = 40;

std::vector<uint32_t> PositionsOf(const SequenceInput& input) {
  if (!input.positions.empty()) return input.positions;
  std::vector<uint32_t> positions(input.num_tokens);
  for (uint32_t t = 0; t < input.num_tokens; ++t) positions[t] = t;
  return positions;
}

// Sums the layers of `result` into its stats.
void FillStats(const ModelShape& shape, uint32_t num_tokens, double reserve_ratio,
               SequenceResult* result) {
  uint64_t held = 0;
  double eq15_sum = 0.0;
  for (const LayerResult& layer : result->layers) {
    held += layer.bytes_held;
    eq15_sum += layer.eq15_ratio;
  }
  CompressionStats& stats = result->stats;
  stats.full_bytes = FullKvBytes(shape, num_tokens);
  stats.held_bytes = held;
  stats.honest_ratio = static_cast<double>(held) / static_cast<double>(stats.full_bytes);
  stats.eq15_ratio = result->layers.empty() ? 1.0 : eq15_sum / result->layers.size();
  stats.reserve_ratio = reserve_ratio;
}

// One sequence under one policy: everything that does not depend on the reserve ratio r
// (scores, LMBA, RoPE angles) is computed once by Prepare(); Evaluate(r) runs the rest.
class SequenceCompressor {
 public:
  SequenceCompressor(const ModelShape& shape, const PolicyConfig& policy,
                     const SequenceInput& input, uint32_t threads,
                     const SimilarityGraphBuilder* similarity_graph, const TopKRanker* ranker,
                     const std::atomic<bool>* cancel)
      : shape_(shape),
        policy_(policy),
        input_(input),
        threads_(threads),
        similarity_graph_(similarity_graph),
        ranker_(ranker),
        cancel_(cancel),
        split_(SplitWindow(input.num_tokens, policy.window)),
        rope_(RopeParamsFromShape(shape)),
        memo_(shape.num_layers) {}

  const WindowSplit& split() const { return split_; }

  absl::Status Prepare() {
    if (policy_.codebook) angles_ = ComputeRopeAngles(rope_, PositionsOf(input_));
    if (!PolicyNeedsScores(policy_) || split_.context == 0) return absl::OkStatus();
    const bool want_lmba = policy_.schedule == BudgetSchedule::kZigZag;
    scores_.resize(shape_.num_layers);
    lmba_.resize(shape_.num_layers);
    return ParallelFor(shape_.num_layers, threads_, [&](uint32_t l) -> absl::Status {
      RETURN_IF_ERROR(CheckCancelled());
      ASSIGN_OR_RETURN(scores_[l],
                       ScoreLayer(shape_, policy_, input_.layers[l], l, split_, want_lmba));
      lmba_[l] = scores_[l].lmba;
      return absl::OkStatus();
    });
  }

  absl::StatusOr<SequenceResult> Evaluate(double reserve_ratio) {
    const double context_ratio = ContextRatio(reserve_ratio, split_);
    const std::vector<double> ratios =
        LayerContextRatios(policy_, shape_.num_layers, context_ratio, split_.context, lmba_);
    RETURN_IF_ERROR(ParallelFor(shape_.num_layers, threads_, [&](uint32_t l) -> absl::Status {
      const uint32_t k = policy_.schedule == BudgetSchedule::kFull
                             ? split_.context
                             : KeptContextCount(ratios[l], split_.context);
      if (!memo_[l].has_value() || memo_[l]->kept_per_head != k + split_.window) {
        RETURN_IF_ERROR(CheckCancelled());
        ASSIGN_OR_RETURN(LayerResult layer, CompressLayer(l, k));
        memo_[l] = std::move(layer);
      }
      return absl::OkStatus();
    }));
    SequenceResult result;
    result.layers.reserve(shape_.num_layers);
    for (uint32_t l = 0; l < shape_.num_layers; ++l) {
      LayerResult layer = *memo_[l];
      layer.context_ratio = ratios[l];
      result.layers.push_back(std::move(layer));
    }
    FillStats(shape_, input_.num_tokens, reserve_ratio, &result);
    return result;
  }

 private:
  absl::Status CheckCancelled() const {
    if (cancel_ != nullptr && cancel_->load(std::memory_order_relaxed)) {
      return absl::CancelledError("compression cancelled between layers");
    }
    return absl::OkStatus();
  }

  absl::StatusOr<LayerResult> CompressLayer(uint32_t l, uint32_t k) {
    LayerResult layer;
    layer.kept_per_head = k + split_.window;
    const uint32_t heads = shape_.num_kv_heads;
    if (k == split_.context) {
      SelectAll(heads, split_.num_tokens, &layer.kept);
    } else if (policy_.scoring == Scoring::kSinksRecent) {
      SelectSinksRecent(heads, split_, k, policy_.sinks, &layer.kept);
    } else {
      RETURN_IF_ERROR(SelectTopK(scores_[l].scores, scores_[l].num_heads, heads, split_, k,
                                 &layer.kept, ranker_));
    }
    if (policy_.codebook) {
      std::unique_ptr<CodebookScratch> scratch = TakeScratch();
      const absl::Status built =
          BuildLayerCodebooks(shape_, policy_, input_.layers[l], rope_, angles_, similarity_graph_,
                              scratch.get(), &layer);
      GiveScratch(std::move(scratch));
      RETURN_IF_ERROR(built);
    }
    layer.bytes_held = LayerBytes(shape_, layer);
    layer.eq15_ratio = LayerEq15Ratio(shape_, layer, input_.num_tokens);
    return layer;
  }

  // The codebook scratch of the layers in flight (at most threads_), reused by later layers of
  // this call and freed with it.
  std::unique_ptr<CodebookScratch> TakeScratch() {
    absl::MutexLock lock(&scratch_mutex_);
    if (idle_scratch_.empty()) return std::make_unique<CodebookScratch>();
    std::unique_ptr<CodebookScratch> scratch = std::move(idle_scratch_.back());
    idle_scratch_.pop_back();
    return scratch;
  }
  void GiveScratch(std::unique_ptr<CodebookScratch> scratch) {
    absl::MutexLock lock(&scratch_mutex_);
    idle_scratch_.push_back(std::move(scratch));
  }

  const ModelShape& shape_;
  const PolicyConfig& policy_;
  const SequenceInput& input_;
  const uint32_t threads_;
  const SimilarityGraphBuilder* const similarity_graph_;
  const TopKRanker* const ranker_;
  const std::atomic<bool>* const cancel_;
  const WindowSplit split_;
  const RopeParams rope_;
  RopeAngles angles_;
  std::vector<LayerScores> scores_;
  std::vector<double> lmba_;
  // The last result of each layer: a layer whose kept count did not change between two
  // evaluations of the search is not selected (or codebooked) again.
  std::vector<std::optional<LayerResult>> memo_;
  absl::Mutex scratch_mutex_;
  std::vector<std::unique_ptr<CodebookScratch>> idle_scratch_ ABSL_GUARDED_BY(scratch_mutex_);
};

absl::Status ByteTargetOutOfRange(double target, double low, double high,
                                  const PolicyConfig& policy) {
  return absl::OutOfRangeError(absl::StrCat("target.value ", target,
                                            " is outside the byte ratios policy \"", policy.name,
                                            "\" can reach on this sequence: [", low, ", ", high,
                                            "] (within ", kByteRatioTolerance * 100, "%)"));
}

// True when every layer of `above` keeps at most one token per head more than in `below`.
bool AtMostOneTokenApart(const SequenceResult& below, const SequenceResult& above) {
  for (size_t l = 0; l < below.layers.size(); ++l) {
    if (above.layers[l].kept_per_head > below.layers[l].kept_per_head + 1) return false;
  }
  return true;
}

// Combines two results of neighbouring r: starting from `below` (honest ratio under the
// target), layers are switched to their `above` version, largest byte step first (ties: lower
// layer first), as long as the total stays within the upper tolerance, until it reaches the
// lower one. Each layer stays a valid selection of its own (r_c(lambda) of `below` or
// `above`); only the split between layers moves, by the one-token steps the floor of eq. 7
// would otherwise make identical in every layer.
SequenceResult MixLayers(const ModelShape& shape, uint32_t num_tokens, double target,
                         SequenceResult below, const SequenceResult& above) {
  const double full = static_cast<double>(below.stats.full_bytes);
  const double lowest = target * (1.0 - kByteRatioTolerance) * full;
  const double highest = target * (1.0 + kByteRatioTolerance) * full;
  std::vector<uint32_t> order(below.layers.size());
  for (uint32_t l = 0; l < order.size(); ++l) order[l] = l;
  auto delta = [&](uint32_t l) {
    return static_cast<double>(above.layers[l].bytes_held) -
           static_cast<double>(below.layers[l].bytes_held);
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](uint32_t x, uint32_t y) { return delta(x) > delta(y); });
  double held = static_cast<double>(below.stats.held_bytes);
  for (uint32_t l : order) {
    if (held >= lowest) break;
    const double step = delta(l);
    if (step > 0.0 && held + step <= highest) {
      below.layers[l] = above.layers[l];
      held += step;
    }
  }
  FillStats(shape, num_tokens, above.stats.reserve_ratio, &below);
  return below;
}

// Finds r whose honest ratio is within kByteRatioTolerance of `target`. Bracketed false
// position with the Illinois modification (the ratio is nearly linear in r, so this converges
// in a few evaluations, each of which may build codebooks), falling back to the midpoint when
// the interpolation leaves the bracket. When the bracket closes on a jump wider than the
// tolerance (short sequences: every layer's kept count steps at the same r), MixLayers
// combines the two sides layer by layer.
absl::StatusOr<SequenceResult> SearchByteRatio(const ModelShape& shape, uint32_t num_tokens,
                                               SequenceCompressor& compressor, double target,
                                               const PolicyConfig& policy) {
  auto error_of = [target](const SequenceResult& r) { return r.stats.honest_ratio / target - 1.0; };
  auto within = [&](const SequenceResult& r) {
    return std::abs(error_of(r)) <= kByteRatioTolerance;
  };
  const WindowSplit& split = compressor.split();
  // Below l_w / l every r keeps the window alone; that is the smallest state.
  const double lowest_r = std::clamp(
      static_cast<double>(split.window) / static_cast<double>(split.num_tokens), 1e-12, 1.0);
  ASSIGN_OR_RETURN(SequenceResult low, compressor.Evaluate(lowest_r));
  if (within(low)) return low;
  ASSIGN_OR_RETURN(SequenceResult high, compressor.Evaluate(1.0));
  if (within(high)) return high;
  const double low_ratio = low.stats.honest_ratio;
  const double high_ratio = high.stats.honest_ratio;
  if (error_of(low) > 0.0 || error_of(high) < 0.0) {
    return ByteTargetOutOfRange(target, low_ratio, high_ratio, policy);
  }

  double a = lowest_r;
  double fa = error_of(low);
  double b = 1.0;
  double fb = error_of(high);
  SequenceResult below = std::move(low);  // the bracket's two sides
  SequenceResult above = std::move(high);
  int side = 0;
  for (int evaluation = 2; evaluation < kMaxSearchEvaluations && b - a > 1e-12; ++evaluation) {
    double c = (a * fb - b * fa) / (fb - fa);
    if (!(c > a && c < b)) c = 0.5 * (a + b);
    ASSIGN_OR_RETURN(SequenceResult mid, compressor.Evaluate(c));
    if (within(mid)) return mid;
    const double fc = error_of(mid);
    if (fc < 0.0) {
      a = c;
      fa = fc;
      below = std::move(mid);
      if (side == -1) fb *= 0.5;
      side = -1;
    } else {
      b = c;
      fb = fc;
      above = std::move(mid);
      if (side == +1) fa *= 0.5;
      side = +1;
    }
    if (AtMostOneTokenApart(below, above)) break;  // no r in between differs by more
  }
  const double below_ratio = below.stats.honest_ratio;
  const double above_ratio = above.stats.honest_ratio;
  SequenceResult mixed = MixLayers(shape, num_tokens, target, std::move(below), above);
  if (within(mixed)) return mixed;
  return absl::OutOfRangeError(
      absl::StrCat("target.value ", target, " cannot be met within ", kByteRatioTolerance * 100,
                   "% by policy \"", policy.name,
                   "\" on this sequence: the nearest byte ratios are ", below_ratio, " and ",
                   above_ratio, " (achievable range [", low_ratio, ", ", high_ratio, "])"));
}

absl::Status ValidateLayerResult(const ModelShape& shape, const SequenceInput& input,
                                 const LayerResult& result) {
  const uint32_t heads = shape.num_kv_heads;
  const size_t vectors = static_cast<size_t>(heads) * result.kept_per_head;
  if (result.kept.size() != vectors) {
    return absl::InvalidArgumentError(
        absl::StrCat("result.kept has ", result.kept.size(), " entries, expected ", vectors));
  }
  for (uint32_t token : result.kept) {
    if (token >= input.num_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("result.kept holds token ", token,
                                                     " >= input.num_tokens ", input.num_tokens));
    }
  }
  if (result.key_codebook.has_value() != result.value_codebook.has_value()) {
    return absl::InvalidArgumentError(
        "result.key_codebook and result.value_codebook must be both set or both unset");
  }
  for (const std::optional<Codebook>* codebook : {&result.key_codebook, &result.value_codebook}) {
    if (!codebook->has_value()) continue;
    const Codebook& c = **codebook;
    if (c.dim != shape.head_dim || c.refs.size() != vectors || c.magnitudes.size() != vectors ||
        c.entries.size() % shape.head_dim != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("result codebook does not match the selection (dim ", c.dim, ", ",
                       c.refs.size(), " refs, ", c.magnitudes.size(), " magnitudes, expected dim ",
                       shape.head_dim, " and ", vectors, ")"));
    }
    for (uint32_t ref : c.refs) {
      if (ref >= c.size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("result codebook ref ", ref, " >= its size ", c.size()));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SequenceResult> CompressSequence(const ModelShape& shape, const PolicyConfig& policy,
                                                const SequenceInput& input,
                                                const CompressTarget& target,
                                                const ComputeOptions& compute) {
  RETURN_IF_ERROR(ValidateShape(shape));
  RETURN_IF_ERROR(ValidatePolicy(policy));
  RETURN_IF_ERROR(ValidateTarget(target));
  RETURN_IF_ERROR(ValidateInput(shape, policy, input));
  const uint32_t threads = compute.max_threads == 0
                               ? std::max(1u, std::thread::hardware_concurrency())
                               : compute.max_threads;
  SequenceCompressor compressor(shape, policy, input, threads, compute.similarity_graph,
                                compute.ranker, compute.cancel);
  RETURN_IF_ERROR(compressor.Prepare());
  if (target.kind == TargetKind::kReserveRatio) return compressor.Evaluate(target.value);
  return SearchByteRatio(shape, input.num_tokens, compressor, target.value, policy);
}

absl::Status MaterializeLayer(const ModelShape& shape, const SequenceInput& input, uint32_t layer,
                              const LayerResult& result, std::vector<float>* keys,
                              std::vector<float>* values) {
  RETURN_IF_ERROR(ValidateShape(shape));
  if (layer >= input.layers.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " >= input.layers size ", input.layers.size()));
  }
  if (!input.positions.empty() && input.positions.size() != input.num_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("input.positions has ", input.positions.size(),
                     " entries, expected input.num_tokens = ", input.num_tokens, " (or none)"));
  }
  RETURN_IF_ERROR(ValidateLayerResult(shape, input, result));
  const uint32_t heads = shape.num_kv_heads;
  const uint32_t dim = shape.head_dim;
  const size_t vectors = static_cast<size_t>(heads) * result.kept_per_head;
  keys->resize(vectors * dim);
  values->resize(vectors * dim);

  if (result.key_codebook.has_value()) {
    ReconstructCodebook(*result.key_codebook, absl::MakeSpan(*keys));
    ReconstructCodebook(*result.value_codebook, absl::MakeSpan(*values));
    // Re-rotate K at each kept token's position; angles only for the tokens that occur.
    const RopeParams rope = RopeParamsFromShape(shape);
    const std::vector<uint32_t> positions = PositionsOf(input);
    constexpr uint32_t kUnused = std::numeric_limits<uint32_t>::max();
    std::vector<uint32_t> compact(input.num_tokens, kUnused);
    std::vector<uint32_t> used_positions;
    std::vector<uint32_t> angle_rows(vectors);
    for (size_t v = 0; v < vectors; ++v) {
      const uint32_t token = result.kept[v];
      if (compact[token] == kUnused) {
        compact[token] = static_cast<uint32_t>(used_positions.size());
        used_positions.push_back(positions[token]);
      }
      angle_rows[v] = compact[token];
    }
    const RopeAngles angles = ComputeRopeAngles(rope, used_positions);
    RotateRows(rope, angles, angle_rows, /*heads=*/1, absl::MakeSpan(*keys), /*inverse=*/false);
    return absl::OkStatus();
  }

  const LayerInput& in = input.layers[layer];
  if (in.keys == nullptr || in.values == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("input.layers[", layer, "].keys and .values are required for a plain layer"));
  }
  for (uint32_t head = 0; head < heads; ++head) {
    for (uint32_t i = 0; i < result.kept_per_head; ++i) {
      const size_t row = static_cast<size_t>(head) * result.kept_per_head + i;
      const size_t src = (static_cast<size_t>(result.kept[row]) * heads + head) * dim;
      std::copy_n(in.keys + src, dim, keys->data() + row * dim);
      std::copy_n(in.values + src, dim, values->data() + row * dim);
    }
  }
  return absl::OkStatus();
}

}  // namespace cachemgr::compress
