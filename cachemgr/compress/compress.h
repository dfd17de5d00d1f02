// KV compression of one sequence: every policy is a preset of independent stages (per-layer
// budget schedule, token scoring, GQA handling, codebook), run on dense host tensors.
//
// This is pure math on float32 host arrays (the CPU twin). The daemon gathers a sequence's
// paged KV into these arrays, calls CompressSequence, and writes the result back into blocks;
// the offline tool feeds it .npy files. Equation numbers refer to the SpindleKV paper
// (shared/seeds/spindlekv-paper.txt) with eq. 5 corrected as MISSION.md §4 says.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cachemgr/compress/codebook.h"

namespace cachemgr::compress {

class SimilarityGraphBuilder;  // codebook_graph.h
class TopKRanker;              // selection.h

enum class RopeStyle : uint8_t { kNone, kInterleaved, kHalfSplit };

// How the model's dtype stores one float. A codebook layer (CodedLayer) rounds every entry,
// magnitude and queued vector it keeps to it, so that it holds exactly what its honest bytes
// count (elem_bytes each) and can travel in them. kFloat32 rounds nothing.
enum class StoredFloat : uint8_t { kFloat32, kFp16, kBf16 };

// `x` as `stored` keeps it (round to nearest even).
float RoundToStored(float x, StoredFloat stored);

struct ModelShape {
  uint32_t num_layers = 0;
  uint32_t num_q_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t elem_bytes = 2;  // bytes per stored element (fp16/bf16: 2, fp32: 4)
  RopeStyle rope_style = RopeStyle::kInterleaved;
  double rope_theta = 10000.0;
  double rope_scaling = 1.0;  // positions are divided by it
  uint32_t rotary_dim = 0;    // 0 = head_dim
  // The daemon sets it from the pool's dtype; the library's own callers may keep float32.
  StoredFloat stored_float = StoredFloat::kFloat32;
};

// ---- Stages -------------------------------------------------------------------------------

enum class BudgetSchedule : uint8_t {
  kFull,     // keep everything (FullKV)
  kUniform,  // every layer keeps r_c of the context
  kPyramid,  // eq. 5-6 (corrected): linear from r_c(0) to r_c(m-1), mean r_c
  kZigZag,   // layer uncertainty: budget_l = B_min + (B_avg - B_min) * L * LMBA_l / sum(LMBA)
};

enum class Scoring : uint8_t {
  kWindow,       // eq. 2 over the observation window (SnapKV / PyramidKV / SpindleKV)
  kAccumulated,  // H2O: attention summed over every provided query, no pooling
  kSinksRecent,  // StreamingLLM: the first `sinks` tokens + the most recent ones, no scores
};

enum class WindowNormalization : uint8_t {
  kLiteral,  // eq. 2 as printed: sum over window rows divided by (l - a)
  kSum,      // SnapKV's public code: plain sum over the window rows
};

enum class Pooling : uint8_t { kNone, kAvg, kMax };

enum class GqaMode : uint8_t {
  kGroupMean,  // eq. 3: average scores over the h_n query heads of a KV head; select per KV head
  kRepeat,     // unfold each KV head to its h_n query heads; rank per query head (selection.h)
};

enum class CodebookScope : uint8_t { kLayer, kKvHead };

struct PolicyConfig {
  std::string name;  // preset name, for reports

  BudgetSchedule schedule = BudgetSchedule::kPyramid;
  double beta = 0.05;                // minimal per-layer context ratio of the pyramid
  double zigzag_tau = 0.9;           // attention mass LMBA must reach
  double zigzag_min_fraction = 0.2;  // B_min = fraction * B_avg

  Scoring scoring = Scoring::kWindow;
  uint32_t window = 32;  // observation window l_w (always kept)
  WindowNormalization normalization = WindowNormalization::kSum;
  Pooling pooling = Pooling::kAvg;
  uint32_t pool_kernel = 5;  // odd
  uint32_t sinks = 4;        // StreamingLLM sink tokens

  GqaMode gqa = GqaMode::kRepeat;

  bool codebook = true;
  float theta_k = 0.98f;
  float theta_v = 0.95f;
  CodebookScope codebook_scope = CodebookScope::kLayer;
  // How the similarity graph is searched (codebook.h): every pair, or hashed candidates.
  CodebookSearch codebook_search = CodebookSearch::kLsh;
  // A layer keeps its codebook form only if that holds fewer bytes than storing its kept
  // vectors plainly (otherwise the codebook would cost memory, not save it).
  bool codebook_only_if_smaller = true;
  // Rows appended to a codebook layer after Compress (decoding): vectors that match no entry
  // queue per codebook part, and are coded together by Algorithm 1 once this many have queued.
  uint32_t append_batch = 32;
};

// The preset a Compress call without one gets: chosen by measurement on the real models
// (docs/QUALITY.md, "The default policy"): of the presets that can meet any ratio, SnapKV is
// the only one ranked in the top two on both NLL change and greedy agreement over every model,
// dataset and byte ratio measured; no policy is at least as good as every baseline everywhere.
inline constexpr char kDefaultPreset[] = "snapkv";

// Named presets: "fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv", "pyramidinfer",
// "zigzagkv", "codebook", "spindlekv". NOT_FOUND lists the known names.
absl::StatusOr<PolicyConfig> PresetPolicy(const std::string& name);
std::vector<std::string> PresetNames();
// INVALID_ARGUMENT naming the field (e.g. "policy.theta_k must be in (0, 1]").
absl::Status ValidatePolicy(const PolicyConfig& policy);

// ---- Inputs -------------------------------------------------------------------------------

// One layer of one sequence in original token order. Keys are read only to score tokens from
// `queries` and to build codebooks, values only for codebooks: a policy without a codebook given
// `scores` needs neither (ValidateInput says which are required).
struct LayerInput {
  const float* keys = nullptr;    // [num_tokens, num_kv_heads, head_dim], post-RoPE (as stored)
  const float* values = nullptr;  // [num_tokens, num_kv_heads, head_dim]
  // Either the observation-window queries of the last `num_queries` positions ...
  const float* queries = nullptr;  // [num_queries, num_q_heads, head_dim], post-RoPE
  uint32_t num_queries = 0;
  // ... or precomputed per-query-head scores (used when queries == nullptr).
  const float* scores = nullptr;  // [num_q_heads, num_tokens]
};

struct SequenceInput {
  uint32_t num_tokens = 0;
  // positions[t]: the RoPE position of token t (normally t); used to un-rotate / re-rotate K.
  // Either num_tokens entries or empty, which means positions[t] = t.
  std::vector<uint32_t> positions;
  std::vector<LayerInput> layers;  // num_layers
};

enum class TargetKind : uint8_t {
  kReserveRatio,  // r of the paper: fraction of tokens kept on average (eq. 5-7)
  kByteRatio,     // honest bytes held / full bytes; met within 1% (searched over r)
};

// kByteRatio: |honest_ratio / value - 1| <= this.
inline constexpr double kByteRatioTolerance = 0.01;

struct CompressTarget {
  TargetKind kind = TargetKind::kReserveRatio;
  double value = 0.2;  // in (0, 1]
};

// ---- Outputs ------------------------------------------------------------------------------

struct LayerResult {
  double context_ratio = 1.0;  // r_c(lambda) used for this layer
  uint32_t kept_per_head = 0;  // tokens kept by every KV head (window included)
  // [num_kv_heads, kept_per_head]: original token indices, ascending per head. Under
  // GqaMode::kRepeat the query heads of a KV head rank the tokens and the KV head takes their
  // rankings round-robin (selection.h), so a layer always stores kept_per_head rows per KV head.
  std::vector<uint32_t> kept;
  // Set when the layer is stored in codebook form. Vectors are ordered [kv head][kept token];
  // key codebooks are built on pre-RoPE K.
  std::optional<Codebook> key_codebook;
  std::optional<Codebook> value_codebook;
  // Codebook parts, num_parts + 1 offsets into the entries (set with the codebooks): part p owns
  // entries [offsets[p], offsets[p+1]) and the vectors of an equal, consecutive share of the
  // KV heads. CodebookScope::kLayer has one part ({0, size}); kKvHead one part per KV
  // head, built independently and concatenated (refs index the concatenation).
  std::vector<uint32_t> key_entry_offsets;
  std::vector<uint32_t> value_entry_offsets;
  uint64_t bytes_held = 0;  // honest bytes of this layer (see CompressionStats)
  double eq15_ratio = 1.0;  // r^lambda = r1 * r2 * r3 of eq. 15
};

struct CompressionStats {
  // Full KV: num_layers * num_tokens * num_kv_heads * head_dim * 2 * elem_bytes.
  uint64_t full_bytes = 0;
  // What is actually held: plain kept vectors (K and V, elem_bytes each), or for codebook
  // layers the entries (elem_bytes each) + per vector a reference (2 bytes when the codebook
  // has < 65536 entries, else 4) + a magnitude (elem_bytes), for K and V.
  uint64_t held_bytes = 0;
  double honest_ratio = 1.0;   // held_bytes / full_bytes
  double eq15_ratio = 1.0;     // mean of the layers' r^lambda (the paper's number)
  double reserve_ratio = 1.0;  // r used (searched when the target is a byte ratio)
};

struct SequenceResult {
  std::vector<LayerResult> layers;
  CompressionStats stats;
};

// Where CompressSequence does its work.
struct ComputeOptions {
  // Layers are scored, selected and coded on up to this many threads (the caller's included;
  // 0: one per hardware thread). The result does not depend on the count.
  uint32_t max_threads = 1;
  // Builds the codebooks' similarity graphs (codebook_graph.h); null: on the host.
  const SimilarityGraphBuilder* similarity_graph = nullptr;
  // Ranks the query heads' scores under GqaMode::kRepeat (selection.h); null: on the host.
  const TopKRanker* ranker = nullptr;
  // When set and true, the work stops before the next layer's scoring or coding and
  // CompressSequence returns CANCELLED (the daemon's shutdown). Null: never.
  const std::atomic<bool>* cancel = nullptr;
};

// Runs the policy. INVALID_ARGUMENT (naming the field) for a bad shape, policy or target, or
// missing queries/scores when the scoring needs them; CANCELLED once compute.cancel is set. Errors
// of BuildCodebook pass through (e.g. RESOURCE_EXHAUSTED when a codebook's bitset cannot be
// allocated). Thread-safe: no shared state; the input arrays are only read.
//
// Per layer: budget (r -> r_c -> r_c(lambda) -> k) -> scores -> selection -> codebook (if on:
// K un-rotated to pre-RoPE at its token's position; kept only if smaller when
// codebook_only_if_smaller) -> accounting. Scores are computed once per layer and reused by
// every step of a byte-ratio search.
//
// kByteRatio searches r in (0, 1] (bracketed false position with bisection safeguard, at most
// 40 evaluations) until |honest_ratio / value - 1| <= kByteRatioTolerance. When the bracket
// closes on a jump wider than that (a short sequence, where every layer's kept count steps at
// the same r), the result mixes the layers of the two sides: some layers take the larger
// selection of the upper side (largest byte step first), so those layers keep a token more than
// the schedule says; stats.reserve_ratio is then the upper side's r. OUT_OF_RANGE naming
// "target.value" with the achievable range when value lies outside [honest ratio at the
// smallest r (window only), honest ratio at r = 1], or when even the mix misses (the message
// gives the nearest ratios). The honest ratio is non-decreasing in r except for codebook
// sizes, which the search treats as noise.
//
// Layers are scored, selected and coded independently (see ComputeOptions).
absl::StatusOr<SequenceResult> CompressSequence(const ModelShape& shape, const PolicyConfig& policy,
                                                const SequenceInput& input,
                                                const CompressTarget& target,
                                                const ComputeOptions& compute);
inline absl::StatusOr<SequenceResult> CompressSequence(const ModelShape& shape,
                                                       const PolicyConfig& policy,
                                                       const SequenceInput& input,
                                                       const CompressTarget& target,
                                                       uint32_t max_threads = 1) {
  return CompressSequence(shape, policy, input, target, ComputeOptions{max_threads});
}

// Rebuilds a layer's kept K and V as dense arrays [num_kv_heads, kept_per_head, head_dim]
// (K post-RoPE at each kept token's original position), from the codebooks or the input.
absl::Status MaterializeLayer(const ModelShape& shape, const SequenceInput& input, uint32_t layer,
                              const LayerResult& result, std::vector<float>* keys,
                              std::vector<float>* values);

}  // namespace cachemgr::compress
