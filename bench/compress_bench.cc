// CPU cost of the SpindleKV compression twin (cachemgr_compress), with every time also given as
// a ratio to a memcpy of the same KV bytes measured in the same benchmark function, so numbers
// taken on a shared or throttled machine stay comparable.
//
//   BM_Codebook/n/d/lsh   one layer x one KV head: BuildCodebook on K (theta 0.98) and on V
//                         (theta 0.95) of n tokens, exact (lsh 0) or hashed (lsh 1) search.
//   BM_CompressLayer/n/d/lsh  the "spindlekv" preset on one layer (4 query heads, 1 KV head,
//                         32 observation-window queries, reserve ratio 0.3) via CompressSequence,
//                         exact (lsh 0) or hashed (lsh 1) codebook search.
//   BM_CodebookSequence/tokens/lsh/layers  codebook-only Compress of a SmolLM2-shaped sequence,
//                         exact (lsh 0) or hashed (lsh 1) similarity search, every core.
//   BM_SpindleSequence/tokens  the "spindlekv" preset on a Llama-3-8B-shaped sequence, every core.
//   BM_CompressCallerTime/tokens/background  how long a codebook-only Compress of a
//                         SmolLM2-shaped sequence blocks the engine, blocking or background
//                         (decoding meanwhile), through the CacheManager.
//   BM_HostStagesFromScores/n/policy/target/threads  what a CUDA pool's Compress does on the
//                         host after the device scored the tokens (see the function).
//   BM_Memcpy/bytes       plain memcpy baseline.
//
// memcpy_ratio = (time of one call) / (time of one memcpy of n * d * 2 (K and V) * 2 bytes, the
// fp16 size of the layer-head's KV), both wall-clock; memcpy_ratio_cpu is the same with thread
// CPU time on both sides (robust to another job sharing the cores). The memcpy time is the
// median of samples (each a >= 2 ms loop) taken before the loop, after every call and after the
// loop, in the same process and benchmark function.
//
// Data is not iid noise: vectors are a seeded mixture of 64 cluster centres (each token =
// centre + small Gaussian noise) plus 10% unclustered outliers, so the similarity graph has
// edges, as in shallow layers. Keys are generated pre-RoPE and then rotated at their positions
// (CompressSequence un-rotates them before building the K codebook).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "cachemgr/backend/host_backend.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/compress/codebook.h"
#include "cachemgr/compress/compress.h"
#include "cachemgr/compress/rope.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/util/clock.h"
#include "cachemgr/util/status_macros.h"

namespace {

using cachemgr::compress::BuildCodebook;
using cachemgr::compress::Codebook;
using Clock = std::chrono::steady_clock;

constexpr uint32_t kClusters = 64;
constexpr double kOutlierFraction = 0.10;
constexpr float kKeyNoise = 0.10f;    // per component; centres have N(0, 1) components
constexpr float kValueNoise = 0.15f;  // V threshold is looser (0.95), so a bit more spread

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// [rows, dim] row-major: mixture of kClusters centres + noise, plus outliers.
std::vector<float> MixtureVectors(uint32_t rows, uint32_t dim, float noise, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::uniform_int_distribution<uint32_t> pick(0, kClusters - 1);
  std::vector<float> centres(static_cast<size_t>(kClusters) * dim);
  for (float& c : centres) c = gauss(rng);
  std::vector<float> out(static_cast<size_t>(rows) * dim);
  for (uint32_t r = 0; r < rows; ++r) {
    float* row = &out[static_cast<size_t>(r) * dim];
    if (unit(rng) < kOutlierFraction) {
      for (uint32_t j = 0; j < dim; ++j) row[j] = gauss(rng);
    } else {
      const float* c = &centres[static_cast<size_t>(pick(rng)) * dim];
      for (uint32_t j = 0; j < dim; ++j) row[j] = c[j] + noise * gauss(rng);
    }
  }
  return out;
}

// Thread CPU time: unaffected by time spent descheduled when another job shares the 2 cores.
double ThreadCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Seconds of one memcpy of `bytes`: `samples` samples, each the mean of a loop of >= 2 ms of
// copies. Appends the per-copy wall and thread-CPU times of every sample.
void MemcpySamples(size_t bytes, int samples, std::vector<double>* wall, std::vector<double>* cpu) {
  static std::vector<char> src, dst;
  if (src.size() < bytes) {
    src.assign(bytes, 1);
    dst.assign(bytes, 0);
  }
  for (int i = 0; i < 3; ++i) std::memcpy(dst.data(), src.data(), bytes);  // warm up
  for (int s = 0; s < samples; ++s) {
    uint64_t reps = 0;
    const double c0 = ThreadCpuSeconds();
    const auto start = Clock::now();
    auto now = start;
    do {
      for (int i = 0; i < 4; ++i) {
        std::memcpy(dst.data(), src.data(), bytes);
        benchmark::DoNotOptimize(dst.data());
        benchmark::ClobberMemory();
      }
      reps += 4;
      now = Clock::now();
    } while (Seconds(start, now) < 0.002);
    const double c1 = ThreadCpuSeconds();
    wall->push_back(Seconds(start, now) / static_cast<double>(reps));
    cpu->push_back((c1 - c0) / static_cast<double>(reps));
  }
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

// Undirected pairs i < j with cos(v_i, v_j) > theta (the similarity graph without self-loops),
// counted outside the timed region, for context only.
uint64_t CountEdges(const std::vector<float>& vectors, uint32_t dim, float theta) {
  const size_t n = vectors.size() / dim;
  std::vector<float> unit(vectors.size());
  for (size_t i = 0; i < n; ++i) {
    float norm = 0;
    for (uint32_t j = 0; j < dim; ++j) norm += vectors[i * dim + j] * vectors[i * dim + j];
    const float inv = norm > 0 ? 1.0f / std::sqrt(norm) : 0.0f;
    for (uint32_t j = 0; j < dim; ++j) unit[i * dim + j] = vectors[i * dim + j] * inv;
  }
  uint64_t edges = 0;
  for (size_t i = 0; i < n; ++i) {
    const float* a = &unit[i * dim];
    for (size_t k = i + 1; k < n; ++k) {
      const float* b = &unit[k * dim];
      float dot = 0;
      for (uint32_t j = 0; j < dim; ++j) dot += a[j] * b[j];
      edges += dot > theta ? 1 : 0;
    }
  }
  return edges;
}

size_t KvFp16Bytes(uint32_t n, uint32_t d) { return static_cast<size_t>(n) * d * 2 * 2; }

// Memcpy is sampled before the loop, after every timed call, and after the loop; the ratio uses
// the median sample. memcpy_spread = max / min sample (near 1 when the machine was steady).
struct MemcpyBaseline {
  size_t bytes;
  std::vector<double> wall, cpu;
  explicit MemcpyBaseline(size_t b) : bytes(b) { MemcpySamples(bytes, 5, &wall, &cpu); }
  void Sample(int samples) { MemcpySamples(bytes, samples, &wall, &cpu); }
};

void SetRatioCounters(benchmark::State& state, double wall_total, double cpu_total, uint64_t calls,
                      const MemcpyBaseline& mc) {
  const double wall = wall_total / static_cast<double>(calls);
  const double cpu = cpu_total / static_cast<double>(calls);
  const double mc_wall = Median(mc.wall);
  const double mc_cpu = Median(mc.cpu);
  state.counters["call_ms"] = wall * 1e3;
  state.counters["call_cpu_ms"] = cpu * 1e3;
  state.counters["memcpy_us"] = mc_wall * 1e6;
  state.counters["memcpy_spread"] = *std::max_element(mc.wall.begin(), mc.wall.end()) /
                                    *std::min_element(mc.wall.begin(), mc.wall.end());
  state.counters["memcpy_ratio"] = wall / mc_wall;    // wall / wall
  state.counters["memcpy_ratio_cpu"] = cpu / mc_cpu;  // thread CPU / thread CPU
  state.counters["kv_fp16_bytes"] = static_cast<double>(mc.bytes);
}

// Times `compress` (one CompressSequence call) in the benchmark loop, sampling the memcpy
// baseline after every call and 5 times after the loop, and sets the ratio counters. Returns the
// last result, or nullopt after reporting a failed call.
std::optional<cachemgr::compress::SequenceResult> TimeCompress(
    benchmark::State& state, MemcpyBaseline& memcpy_baseline,
    const std::function<absl::StatusOr<cachemgr::compress::SequenceResult>()>& compress) {
  double total = 0, cpu_total = 0;
  uint64_t calls = 0;
  std::optional<cachemgr::compress::SequenceResult> last;
  for (auto _ : state) {
    const double c0 = ThreadCpuSeconds();
    const auto t0 = Clock::now();
    auto result = compress();
    const auto t1 = Clock::now();
    cpu_total += ThreadCpuSeconds() - c0;
    if (!result.ok()) {
      state.SkipWithError(std::string(result.status().message()).c_str());
      return std::nullopt;
    }
    benchmark::DoNotOptimize(result->layers.data());
    total += Seconds(t0, t1);
    ++calls;
    state.PauseTiming();
    last = *std::move(result);
    memcpy_baseline.Sample(1);
    state.ResumeTiming();
  }
  memcpy_baseline.Sample(5);
  SetRatioCounters(state, total, cpu_total, calls, memcpy_baseline);
  return last;
}

void BM_Codebook(benchmark::State& state) {
  const auto n = static_cast<uint32_t>(state.range(0));
  const auto d = static_cast<uint32_t>(state.range(1));
  cachemgr::compress::CodebookOptions options;
  if (state.range(2) == 1) options.search = cachemgr::compress::CodebookSearch::kLsh;
  const std::vector<float> keys = MixtureVectors(n, d, kKeyNoise, 1000 + n * 7 + d);
  const std::vector<float> values = MixtureVectors(n, d, kValueNoise, 2000 + n * 7 + d);
  const size_t kv_bytes = KvFp16Bytes(n, d);

  MemcpyBaseline memcpy_baseline(kv_bytes);
  double total = 0, cpu_total = 0, k_total = 0, v_total = 0;
  uint64_t calls = 0;
  uint32_t k_entries = 0, v_entries = 0;
  for (auto _ : state) {
    const double c0 = ThreadCpuSeconds();
    const auto t0 = Clock::now();
    auto k = BuildCodebook(keys, d, 0.98f, options);
    const auto t1 = Clock::now();
    auto v = BuildCodebook(values, d, 0.95f, options);
    const auto t2 = Clock::now();
    cpu_total += ThreadCpuSeconds() - c0;
    if (!k.ok() || !v.ok()) {
      state.SkipWithError("BuildCodebook failed");
      return;
    }
    benchmark::DoNotOptimize(k->refs.data());
    benchmark::DoNotOptimize(v->refs.data());
    k_entries = k->size();
    v_entries = v->size();
    k_total += Seconds(t0, t1);
    v_total += Seconds(t1, t2);
    total += Seconds(t0, t2);
    ++calls;
    state.PauseTiming();
    memcpy_baseline.Sample(1);
    state.ResumeTiming();
  }
  memcpy_baseline.Sample(5);
  SetRatioCounters(state, total, cpu_total, calls, memcpy_baseline);
  state.counters["k_edges"] = static_cast<double>(CountEdges(keys, d, 0.98f));
  state.counters["v_edges"] = static_cast<double>(CountEdges(values, d, 0.95f));
  state.counters["k_ms"] = k_total / calls * 1e3;
  state.counters["v_ms"] = v_total / calls * 1e3;
  state.counters["k_entries"] = k_entries;
  state.counters["v_entries"] = v_entries;
  state.counters["codebook_entries"] = k_entries + v_entries;
}

void BM_CompressLayer(benchmark::State& state) {
  namespace cc = cachemgr::compress;
  const auto n = static_cast<uint32_t>(state.range(0));
  const auto d = static_cast<uint32_t>(state.range(1));
  cc::ModelShape shape;
  shape.num_layers = 1;
  shape.num_q_heads = 4;
  shape.num_kv_heads = 1;
  shape.head_dim = d;
  shape.elem_bytes = 2;
  shape.rope_style = cc::RopeStyle::kInterleaved;
  constexpr uint32_t kWindow = 32;

  auto policy = cc::PresetPolicy("spindlekv");
  if (!policy.ok()) {
    state.SkipWithError("no spindlekv preset");
    return;
  }
  policy->window = kWindow;
  policy->codebook_search =
      state.range(2) == 1 ? cc::CodebookSearch::kLsh : cc::CodebookSearch::kExact;

  // Pre-RoPE mixtures; K rotated at its positions (stored post-RoPE, as the engine has it).
  std::vector<float> keys = MixtureVectors(n, d, kKeyNoise, 3000 + n * 7 + d);
  const std::vector<float> values = MixtureVectors(n, d, kValueNoise, 4000 + n * 7 + d);
  // Queries for the last kWindow positions, 4 heads each, drawn from the same kind of mixture.
  std::vector<float> queries = MixtureVectors(kWindow * shape.num_q_heads, d, 0.3f, 5000 + d);
  const cc::RopeParams rope = cc::RopeParamsFromShape(shape);
  std::vector<uint32_t> positions(n);
  for (uint32_t t = 0; t < n; ++t) positions[t] = t;
  std::vector<uint32_t> q_positions(positions.end() - kWindow, positions.end());
  if (!cc::ApplyRope(rope, positions, 1, absl::MakeSpan(keys)).ok() ||
      !cc::ApplyRope(rope, q_positions, shape.num_q_heads, absl::MakeSpan(queries)).ok()) {
    state.SkipWithError("ApplyRope failed");
    return;
  }

  cc::SequenceInput input;
  input.num_tokens = n;
  cc::LayerInput layer;
  layer.keys = keys.data();
  layer.values = values.data();
  layer.queries = queries.data();
  layer.num_queries = kWindow;
  input.layers.push_back(layer);
  cc::CompressTarget target;
  target.kind = cc::TargetKind::kReserveRatio;
  target.value = 0.3;

  MemcpyBaseline memcpy_baseline(KvFp16Bytes(n, d));
  const std::optional<cc::SequenceResult> last = TimeCompress(
      state, memcpy_baseline, [&] { return cc::CompressSequence(shape, *policy, input, target); });
  if (!last.has_value()) return;
  const cc::LayerResult& lr = last->layers.at(0);
  state.counters["kept_per_head"] = lr.kept_per_head;
  state.counters["codebook_layer"] = lr.key_codebook.has_value() ? 1 : 0;
  state.counters["codebook_entries"] = (lr.key_codebook ? lr.key_codebook->size() : 0) +
                                       (lr.value_codebook ? lr.value_codebook->size() : 0);
  state.counters["honest_ratio"] = last->stats.honest_ratio;
}

// The host stages a CUDA pool's Compress runs after the device computed the window scores
// (docs/GPU.md): normalisation, pooling, GQA, budgets, selection and, for a byte target, the
// search, on a Llama-3-8B-shaped sequence (32 layers, 32 q / 8 KV heads, head_dim 128) from
// precomputed scores alone (no K/V, as the daemon passes them). Args: n, policy (0 snapkv,
// 1 pyramidkv), target (0 reserve ratio 0.3, 1 byte ratio 0.3), threads. The memcpy baseline
// copies the score rows (32 layers x 32 heads x n float32) the stages read.
void BM_HostStagesFromScores(benchmark::State& state) {
  namespace cc = cachemgr::compress;
  const auto n = static_cast<uint32_t>(state.range(0));
  const char* preset = state.range(1) == 0 ? "snapkv" : "pyramidkv";
  const auto threads = static_cast<uint32_t>(state.range(3));
  cc::ModelShape shape;
  shape.num_layers = 32;
  shape.num_q_heads = 32;
  shape.num_kv_heads = 8;
  shape.head_dim = 128;
  shape.elem_bytes = 2;
  shape.rope_style = cc::RopeStyle::kHalfSplit;
  shape.rope_theta = 500000.0;
  auto policy = cc::PresetPolicy(preset);
  if (!policy.ok()) {
    state.SkipWithError("no preset");
    return;
  }
  // Window-sum-like scores: positive, heavy-tailed, a different draw per layer and head.
  std::mt19937_64 rng(77 + n);
  std::exponential_distribution<float> tail(1.0f);
  const size_t per_layer = size_t{shape.num_q_heads} * n;
  std::vector<float> scores(size_t{shape.num_layers} * per_layer);
  for (float& x : scores) x = tail(rng) * tail(rng);
  cc::SequenceInput input;
  input.num_tokens = n;
  input.layers.resize(shape.num_layers);
  for (uint32_t l = 0; l < shape.num_layers; ++l) input.layers[l].scores = &scores[l * per_layer];
  cc::CompressTarget target;
  target.kind = state.range(2) == 0 ? cc::TargetKind::kReserveRatio : cc::TargetKind::kByteRatio;
  target.value = 0.3;

  MemcpyBaseline memcpy_baseline(scores.size() * sizeof(float));
  const std::optional<cc::SequenceResult> last = TimeCompress(state, memcpy_baseline, [&] {
    return cc::CompressSequence(shape, *policy, input, target, threads);
  });
  if (last.has_value()) state.counters["honest_ratio"] = last->stats.honest_ratio;
}

// SmolLM2-135M's attention shape (9 query / 3 KV heads, head_dim 64, interleaved RoPE, theta
// 100000) with `num_layers` layers of `elem_bytes`-byte elements.
cachemgr::compress::ModelShape SmolLm2Shape(uint32_t num_layers, uint32_t elem_bytes) {
  cachemgr::compress::ModelShape shape;
  shape.num_layers = num_layers;
  shape.num_q_heads = 9;
  shape.num_kv_heads = 3;
  shape.head_dim = 64;
  shape.elem_bytes = elem_bytes;
  shape.rope_style = cachemgr::compress::RopeStyle::kInterleaved;
  shape.rope_theta = 100000.0;
  return shape;
}

// A sequence of `tokens` tokens over every layer of `shape`, as the sequence benchmarks use: K
// and V are mixtures like BM_Codebook's (three seeds from `seed`, cycled over the layers), K
// rotated at its positions; with `window` > 0, that many window queries per layer (a looser
// mixture) rotated at the last positions. `input` points into the vectors.
struct MixtureSequence {
  std::vector<std::vector<float>> keys, values, queries;
  cachemgr::compress::SequenceInput input;
};

absl::StatusOr<MixtureSequence> MakeMixtureSequence(const cachemgr::compress::ModelShape& shape,
                                                    uint32_t tokens, uint32_t window,
                                                    uint64_t seed) {
  namespace cc = cachemgr::compress;
  constexpr int kDistinctLayers = 3;
  const uint32_t rows = tokens * shape.num_kv_heads;
  const cc::RopeParams rope = cc::RopeParamsFromShape(shape);
  std::vector<uint32_t> positions(tokens);
  for (uint32_t t = 0; t < tokens; ++t) positions[t] = t;
  const std::vector<uint32_t> q_positions(positions.end() - window, positions.end());
  MixtureSequence out;
  for (int k = 0; k < kDistinctLayers; ++k) {
    out.keys.push_back(MixtureVectors(rows, shape.head_dim, kKeyNoise, seed + tokens + k));
    out.values.push_back(
        MixtureVectors(rows, shape.head_dim, kValueNoise, seed + 1000 + tokens + k));
    RETURN_IF_ERROR(
        cc::ApplyRope(rope, positions, shape.num_kv_heads, absl::MakeSpan(out.keys.back())));
    if (window > 0) {
      out.queries.push_back(MixtureVectors(window * shape.num_q_heads, shape.head_dim, 0.3f,
                                           seed + 1500 + tokens + k));
      RETURN_IF_ERROR(
          cc::ApplyRope(rope, q_positions, shape.num_q_heads, absl::MakeSpan(out.queries.back())));
    }
  }
  out.input.num_tokens = tokens;
  for (uint32_t l = 0; l < shape.num_layers; ++l) {
    cc::LayerInput layer;
    layer.keys = out.keys[l % kDistinctLayers].data();
    layer.values = out.values[l % kDistinctLayers].data();
    if (window > 0) {
      layer.queries = out.queries[l % kDistinctLayers].data();
      layer.num_queries = window;
    }
    out.input.layers.push_back(layer);
  }
  return out;
}

// A codebook-only Compress of a whole SmolLM2-135M-shaped sequence (30 layers, 9 query / 3 KV
// heads, head_dim 64: about 3 * tokens vectors per layer codebook, K and V) on every core, with
// the exact or the hashed similarity search. Args: tokens, search (0 exact, 1 LSH), layers (30
// for the model; fewer where exact would take minutes, e.g. 32k tokens). Every layer's K and V
// are a mixture like BM_Codebook's (three seeds, cycled over the layers), K rotated at its
// positions. docs/PERF.md measures the same on the real model with cachemgr-eval.
void BM_CodebookSequence(benchmark::State& state) {
  namespace cc = cachemgr::compress;
  const auto tokens = static_cast<uint32_t>(state.range(0));
  const bool lsh = state.range(1) == 1;
  const cc::ModelShape shape = SmolLm2Shape(static_cast<uint32_t>(state.range(2)), 2);
  auto policy = cc::PresetPolicy("codebook");
  if (!policy.ok()) {
    state.SkipWithError("no codebook preset");
    return;
  }
  policy->codebook_search = lsh ? cc::CodebookSearch::kLsh : cc::CodebookSearch::kExact;
  const uint32_t rows = tokens * shape.num_kv_heads;
  absl::StatusOr<MixtureSequence> sequence =
      MakeMixtureSequence(shape, tokens, /*window=*/0, /*seed=*/6000);
  if (!sequence.ok()) {
    state.SkipWithError(std::string(sequence.status().message()).c_str());
    return;
  }
  const cc::SequenceInput& input = sequence->input;
  cc::CompressTarget target;
  target.kind = cc::TargetKind::kReserveRatio;
  target.value = 1.0;

  MemcpyBaseline memcpy_baseline(size_t{shape.num_layers} * KvFp16Bytes(rows, shape.head_dim));
  const std::optional<cc::SequenceResult> last = TimeCompress(state, memcpy_baseline, [&] {
    return cc::CompressSequence(shape, *policy, input, target, /*max_threads=*/0);
  });
  if (!last.has_value()) return;
  double entries = 0;
  for (const cc::LayerResult& lr : last->layers) {
    entries += (lr.key_codebook ? lr.key_codebook->size() : 0) +
               (lr.value_codebook ? lr.value_codebook->size() : 0);
  }
  state.counters["codebook_entries"] = entries;
  state.counters["honest_ratio"] = last->stats.honest_ratio;
  state.counters["threads"] = std::thread::hardware_concurrency();
}

// SpindleKV ("spindlekv" preset: codebooks for the shallow layers, pyramid budgets by window
// attention for the deep ones, reserve ratio 0.3) on a Llama-3-8B-shaped sequence (32 layers,
// 32 q / 8 KV heads, head_dim 128) on every core, the hashed codebook search: the CPU path of
// the 32k measurement. Args: tokens. K and V as BM_CodebookSequence's (three seeds
// cycled over the layers), 32 window queries per layer from a looser mixture.
void BM_SpindleSequence(benchmark::State& state) {
  namespace cc = cachemgr::compress;
  const auto tokens = static_cast<uint32_t>(state.range(0));
  cc::ModelShape shape;
  shape.num_layers = 32;
  shape.num_q_heads = 32;
  shape.num_kv_heads = 8;
  shape.head_dim = 128;
  shape.elem_bytes = 2;
  shape.rope_style = cc::RopeStyle::kHalfSplit;
  shape.rope_theta = 500000.0;
  constexpr uint32_t kWindow = 32;
  auto policy = cc::PresetPolicy("spindlekv");
  if (!policy.ok()) {
    state.SkipWithError("no spindlekv preset");
    return;
  }
  policy->window = kWindow;
  const uint32_t rows = tokens * shape.num_kv_heads;
  absl::StatusOr<MixtureSequence> sequence =
      MakeMixtureSequence(shape, tokens, kWindow, /*seed=*/8000);
  if (!sequence.ok()) {
    state.SkipWithError(std::string(sequence.status().message()).c_str());
    return;
  }
  const cc::SequenceInput& input = sequence->input;
  cc::CompressTarget target;
  target.kind = cc::TargetKind::kReserveRatio;
  target.value = 0.3;
  MemcpyBaseline memcpy_baseline(size_t{shape.num_layers} * KvFp16Bytes(rows, shape.head_dim));
  const std::optional<cc::SequenceResult> last = TimeCompress(state, memcpy_baseline, [&] {
    return cc::CompressSequence(shape, *policy, input, target, /*max_threads=*/0);
  });
  if (!last.has_value()) return;
  double codebook_layers = 0;
  for (const cc::LayerResult& lr : last->layers) codebook_layers += lr.key_codebook ? 1 : 0;
  state.counters["codebook_layers"] = codebook_layers;
  state.counters["honest_ratio"] = last->stats.honest_ratio;
  state.counters["threads"] = std::thread::hardware_concurrency();
}

void BM_Memcpy(benchmark::State& state) {
  const auto bytes = static_cast<size_t>(state.range(0));
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(bytes));
}

void CodebookArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "d", "lsh"});
  for (int64_t n : {1024, 4096}) {
    for (int64_t d : {64, 128}) b->Args({n, d, 0});
  }
  b->Args({4096, 64, 1});  // LSH (hashing runs from 2048 vectors; exact below)
}
void CodebookArgsLarge(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "d", "lsh"});
  for (int64_t d : {64, 128}) b->Args({16384, d, 0});
  for (int64_t d : {64, 128}) b->Args({16384, d, 1});
}

}  // namespace

// The engine's side of a codebook-only Compress of a SmolLM2-135M-shaped sequence (as
// BM_CodebookSequence's, in an fp32 host pool) through the CacheManager: how long the caller is
// blocked. Args: tokens, background. Blocking (0): the whole Compress call. Background (1):
// Compress returns once it has what it needs; the engine then decodes one token per step
// (Allocate 1, then a 10 ms forward it spends elsewhere: sleeping, as on a GPU) and polls
// FinishCompress without waiting until it applies; blocked_ms sums those calls (start_ms the
// Compress call, poll_us a poll that found it working, apply_ms the one that applied it).
// work_ms: from the Compress call to the result applied; steps: decode steps meanwhile.
void BM_CompressCallerTime(benchmark::State& state) {
  namespace cc = cachemgr::compress;
  using cachemgr::CacheManager;
  const auto tokens = static_cast<uint32_t>(state.range(0));
  const bool background = state.range(1) == 1;
  cachemgr::HostBackend backend;
  cachemgr::RealClock clock;
  cachemgr::CacheManagerOptions options;
  options.memory_budget_bytes = uint64_t{8} << 30;
  options.lease_timeout = absl::Hours(1);
  CacheManager manager(options, &backend, &clock, nullptr);
  const cc::ModelShape shape = SmolLm2Shape(30, 4);
  cachemgr::ModelSpec model;
  model.name = "smollm2-shape";
  model.num_layers = shape.num_layers;
  model.num_q_heads = shape.num_q_heads;
  model.num_kv_heads = shape.num_kv_heads;
  model.head_dim = shape.head_dim;
  model.dtype = cachemgr::DType::kFp32;
  model.block_size = 16;
  model.rope.style = cachemgr::RopeStyle::kInterleaved;
  model.rope.theta = shape.rope_theta;
  const uint32_t num_blocks = tokens / model.block_size + 256;  // and the decode steps
  auto attached = manager.Attach({"bench", model, num_blocks});
  if (!attached.ok()) {
    state.SkipWithError(std::string(attached.status().message()).c_str());
    return;
  }
  const std::string& token = attached->session_token;
  auto fds = manager.ShareFds(token);
  auto pool =
      fds.ok() ? cachemgr::MemfdRegion::Map(std::move((*fds)[0]), attached->pool.regions[0].bytes)
               : absl::StatusOr<cachemgr::MemfdRegion>(fds.status());
  absl::StatusOr<MixtureSequence> sequence = MakeMixtureSequence(shape, tokens, 0, 6000);
  if (!pool.ok() || !sequence.ok()) {
    state.SkipWithError("setting the sequence up failed");
    return;
  }
  const cachemgr::kernels::KvLayerLayout layout = attached->pool.model.LayerLayout(num_blocks);
  const uint32_t hkv = model.num_kv_heads, dim = model.head_dim;
  // Prefills "it": allocates its tokens and writes their K and V through the mapped pool.
  auto prefill = [&]() -> bool {
    auto alloc = manager.Allocate(token, "it", tokens);
    if (!alloc.ok()) return false;
    for (uint32_t l = 0; l < shape.num_layers; ++l) {
      const cc::LayerInput& in = sequence->input.layers[l];
      for (uint32_t t = 0; t < tokens; ++t) {
        const int64_t slot = alloc->layers[l].slot_mapping[t];
        for (uint32_t h = 0; h < hkv; ++h) {
          const size_t at = (size_t{t} * hkv + h) * dim;
          for (const auto plane :
               {cachemgr::kernels::KvPlane::kKey, cachemgr::kernels::KvPlane::kValue}) {
            std::byte* dst =
                pool->data() + attached->pool.layers[l].offset +
                layout.head_offset(plane, slot / model.block_size, slot % model.block_size, h);
            const float* src = plane == cachemgr::kernels::KvPlane::kKey ? in.keys : in.values;
            std::memcpy(dst, src + at, dim * sizeof(float));
          }
        }
      }
    }
    return true;
  };
  cachemgr::CompressParams params;
  params.policy = *cachemgr::ResolvePreset("codebook");
  params.target = {cc::TargetKind::kReserveRatio, 1.0};
  params.input = cachemgr::CompressInput::kNone;
  params.background = background;
  double blocked = 0, start_s = 0, polls = 0, apply_s = 0, work = 0, steps = 0, appended = 0;
  for (auto _ : state) {
    if (!prefill()) {
      state.SkipWithError("the prefill failed");
      return;
    }
    const auto start = Clock::now();
    auto started = manager.Compress(token, "it", params);
    start_s += Seconds(start, Clock::now());
    absl::StatusOr<cachemgr::CompressResult> result = started;
    while (result.ok() && result->pending) {
      if (!manager.Allocate(token, "it", 1).ok()) {
        state.SkipWithError("a decode step failed");
        return;
      }
      ++steps;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));  // the forward
      const auto poll = Clock::now();
      result = manager.FinishCompress(token, "it", /*wait=*/false, "");
      const double took = Seconds(poll, Clock::now());
      (result.ok() && result->pending ? polls : apply_s) += took;
    }
    blocked += start_s + polls + apply_s;
    work += Seconds(start, Clock::now());
    if (!result.ok()) {
      state.SkipWithError(std::string(result.status().message()).c_str());
      return;
    }
    appended += result->rows_appended;
    if (!manager.Free(token, "it").ok()) {
      state.SkipWithError("free failed");
      return;
    }
  }
  const double n = static_cast<double>(state.iterations());
  state.counters["blocked_ms"] = 1e3 * blocked / n;
  state.counters["start_ms"] = 1e3 * start_s / n;
  state.counters["apply_ms"] = 1e3 * apply_s / n;
  state.counters["poll_us"] = steps > 0 ? 1e6 * polls / steps : 0;
  state.counters["work_ms"] = 1e3 * work / n;
  state.counters["steps"] = steps / n;
  state.counters["rows_appended"] = appended / n;
}

BENCHMARK(BM_Codebook)->Apply(CodebookArgs)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Codebook)
    ->Apply(CodebookArgsLarge)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(3);
BENCHMARK(BM_CompressLayer)->Apply(CodebookArgs)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_CompressLayer)
    ->Apply(CodebookArgsLarge)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(3);
BENCHMARK(BM_CodebookSequence)
    ->ArgNames({"tokens", "lsh", "layers"})
    ->Args({2048, 0, 30})
    ->Args({2048, 1, 30})
    ->Args({8192, 0, 30})
    ->Args({8192, 1, 30})
    ->Args({32768, 1, 30})
    ->Args({32768, 0, 2})
    ->Args({32768, 1, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);
BENCHMARK(BM_SpindleSequence)
    ->ArgNames({"tokens"})
    ->Arg(8192)
    ->Arg(32768)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);
BENCHMARK(BM_CompressCallerTime)
    ->ArgNames({"tokens", "background"})
    ->ArgsProduct({{2048, 8192}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);
BENCHMARK(BM_HostStagesFromScores)
    ->ArgNames({"n", "policy", "target", "threads"})
    ->ArgsProduct({{4096, 16384, 32768}, {0, 1}, {0, 1}, {1}})
    ->Args({32768, 0, 1, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(3);
// n * d * 2 * 2 for the (n, d) pairs above.
BENCHMARK(BM_Memcpy)
    ->Arg(256 << 10)
    ->Arg(512 << 10)
    ->Arg(1 << 20)
    ->Arg(2 << 20)
    ->Arg(4 << 20)
    ->Arg(8 << 20)
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
