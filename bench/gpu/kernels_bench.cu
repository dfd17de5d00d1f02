// GPU benchmarks of the kernels, each against a cudaMemcpyAsync device-to-device copy of the
// same bytes measured in the same run (docs/GPU.md records the results):
//   data movement   token gather (pool -> f32 rows), slot write (reshape_and_cache), head
//                   compaction, codebook reconstruction + RoPE + scatter (Fetch)
//   compression     window attention column sums, per-head top-k ranking, codebook
//                   normalisation + similarity bitset, per layer of a Llama-3-8B-shaped
//                   sequence (32 q / 8 KV heads, head_dim 128, bf16, block 16) at 4k/16k/32k
// Times are medians of 20 runs after 3 warm-ups, by CUDA events on one stream.
//
//   cachemgr_bench_gpu [--json=FILE]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cachemgr/kernels/kv_layout.h"
#include "kernels/cuda/attention_scores.h"
#include "kernels/cuda/codebook_graph.h"
#include "kernels/cuda/rank_topk.h"
#include "kernels/cuda/rope_rows.h"
#include "kernels/cuda/token_rows.h"
#include "kernels/cuda/write_kv.h"

namespace cachemgr::kernels {
namespace {

constexpr uint32_t kQHeads = 32, kKvHeads = 8, kDim = 128, kBlock = 16, kLayers = 32;
constexpr uint32_t kWindow = 32;

#define CHECK_CUDA(expr)                                                                          \
  do {                                                                                            \
    cudaError_t e_ = (expr);                                                                      \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)
#define CHECK_OK(expr)                                                                \
  do {                                                                                \
    absl::Status s_ = (expr);                                                         \
    if (!s_.ok()) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, s_.ToString().c_str()); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

void* Alloc(size_t bytes) {
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, bytes == 0 ? 1 : bytes));
  CHECK_CUDA(cudaMemset(p, 0, bytes == 0 ? 1 : bytes));
  return p;
}

template <typename T>
T* Upload(const std::vector<T>& v) {
  T* p = static_cast<T*>(Alloc(v.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

// Median milliseconds of fn() on `stream`.
double TimeMs(cudaStream_t stream, const std::function<void()>& fn) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < 20; ++i) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    fn();
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Row {
  std::string name;
  uint32_t tokens;
  double ms;
  double bytes;      // bytes read + written by the op
  double memcpy_ms;  // cudaMemcpyAsync D2D of bytes / 2 (the same traffic)
};

std::vector<Row> rows;

double MemcpyMs(cudaStream_t stream, size_t bytes) {
  void* a = Alloc(bytes);
  void* b = Alloc(bytes);
  const double ms = TimeMs(
      stream, [&] { CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream)); });
  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));
  return ms;
}

void Record(cudaStream_t stream, const std::string& name, uint32_t tokens, double ms,
            double bytes) {
  rows.push_back({name, tokens, ms, bytes, bytes > 0 ? MemcpyMs(stream, size_t(bytes / 2)) : 0});
}

void BenchSequence(cudaStream_t stream, uint32_t tokens, std::mt19937& rng) {
  KvLayerLayout layout;
  layout.order = KvOrder::kFlashAttn;
  layout.num_blocks = tokens / kBlock + 64;
  layout.block_size = kBlock;
  layout.num_kv_heads = kKvHeads;
  layout.head_dim = kDim;
  layout.elem_bytes = 2;
  auto* layer = static_cast<std::byte*>(Alloc(layout.layer_bytes()));
  const size_t row = size_t{kKvHeads} * kDim;

  // Slots of a shuffled block table, as a real sequence's.
  std::vector<uint32_t> table(layout.num_blocks);
  std::iota(table.begin(), table.end(), 0u);
  std::shuffle(table.begin(), table.end(), rng);
  std::vector<int64_t> slots(tokens);
  for (uint32_t t = 0; t < tokens; ++t) slots[t] = int64_t{table[t / kBlock]} * kBlock + t % kBlock;
  int64_t* dev_slots = Upload(slots);
  uint32_t* dev_table = Upload(table);

  // Slot write: rows [tokens, row] bf16 into the pool.
  auto* src_k = static_cast<std::byte*>(Alloc(tokens * layout.token_bytes()));
  auto* src_v = static_cast<std::byte*>(Alloc(tokens * layout.token_bytes()));
  Record(
      stream, "slot write (reshape_and_cache)", tokens,
      TimeMs(stream,
             [&] {
               CHECK_OK(WriteKvBySlotCuda(layout, layer, src_k, src_v, dev_slots, tokens, stream));
             }),
      4.0 * tokens * layout.token_bytes());

  // Gather to float32 rows (what Compress reads).
  auto* keys = static_cast<float*>(Alloc(tokens * row * 4));
  auto* values = static_cast<float*>(Alloc(tokens * row * 4));
  Record(stream, "gather bf16 -> f32 rows", tokens,
         TimeMs(stream,
                [&] {
                  CHECK_OK(GatherTokensF32Cuda(layout, KvElemType::kBf16, layer, dev_slots, tokens,
                                               keys, values, stream));
                }),
         2.0 * tokens * layout.token_bytes() + 2.0 * tokens * row * 4);

  // Compaction keeping half the tokens per head.
  const uint32_t kept_rows = tokens / 2;
  std::vector<uint32_t> kept;
  for (uint32_t h = 0; h < kKvHeads; ++h) {
    std::vector<uint32_t> all(tokens);
    std::iota(all.begin(), all.end(), 0u);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(kept_rows);
    std::sort(all.begin(), all.end());
    kept.insert(kept.end(), all.begin(), all.end());
  }
  uint32_t* dev_kept = Upload(kept);
  auto* scratch = static_cast<std::byte*>(Alloc(CompactHeadsScratchBytes(layout, kept_rows)));
  Record(stream, "compaction (keep 50%)", tokens,
         TimeMs(stream,
                [&] {
                  CHECK_OK(CompactHeadsCuda(layout, layer, dev_table, dev_kept, kept_rows, scratch,
                                            stream));
                }),
         4.0 * CompactHeadsScratchBytes(layout, kept_rows));

  // Scoring: 32 window queries, 32 query heads.
  AttentionShape shape{tokens, kQHeads, kKvHeads, kDim, kWindow};
  std::vector<float> q(size_t{kWindow} * kQHeads * kDim);
  std::normal_distribution<float> normal;
  for (float& x : q) x = normal(rng);
  float* dev_q = Upload(q);
  auto* sums = static_cast<float*>(Alloc(size_t{kQHeads} * tokens * 4));
  auto* att_scratch = static_cast<std::byte*>(Alloc(AttentionScratchBytes(shape)));
  Record(stream, "window attention column sums", tokens,
         TimeMs(stream,
                [&] {
                  CHECK_OK(AttentionColumnSumsCuda(shape, keys, dev_q, sums, att_scratch, stream));
                }),
         0);

  // Ranking: every query head ranks the context, k = 20%.
  const size_t rank_bytes = RankTopKScratchBytes(kQHeads, tokens);
  auto* rank_scratch = static_cast<std::byte*>(Alloc(rank_bytes));
  auto* ranked = static_cast<uint32_t*>(Alloc(size_t{kQHeads} * tokens * 4));
  Record(stream, "top-k ranking (32 heads, k = 20%)", tokens,
         TimeMs(stream,
                [&] {
                  CHECK_OK(RankTopKCuda(sums, kQHeads, tokens, tokens / 5, ranked, rank_scratch,
                                        rank_bytes, stream));
                }),
         0);

  // Codebook graph of one chunk of min(16384, tokens) vectors (Algorithm 1's largest graph).
  const uint32_t n = std::min(tokens, 16384u);
  auto* unit = static_cast<float*>(Alloc(size_t{n} * kDim * 4));
  auto* magnitude = static_cast<float*>(Alloc(n * 4));
  auto* nonzero = static_cast<uint8_t*>(Alloc(n));
  auto* finite = static_cast<uint8_t*>(Alloc(n));
  auto* adjacency = static_cast<uint64_t*>(Alloc(size_t{n} * ((n + 63) / 64) * 8));
  Record(
      stream, "codebook normalise (n vectors, d 128)", n,
      TimeMs(stream,
             [&] {
               CHECK_OK(NormalizeRowsCuda(keys, n, kDim, unit, magnitude, nonzero, finite, stream));
             }),
      0);
  Record(
      stream, "codebook similarity bitset (n^2 d)", n,
      TimeMs(stream,
             [&] {
               CHECK_OK(SimilarityAdjacencyCuda(unit, nonzero, n, kDim, 0.98f, adjacency, stream));
             }),
      0);

  // Fetch of a codebook layer: reconstruct rows, re-apply RoPE, scatter into the pool, against
  // copying the same uncompressed layer bytes.
  const uint32_t entries = n / 4;
  std::vector<uint32_t> refs(size_t{tokens} * kKvHeads);
  for (uint32_t& r : refs) r = rng() % entries;
  uint32_t* dev_refs = Upload(refs);
  std::vector<float> cos(size_t{tokens} * kDim / 2, 0.5f), sin(cos.size(), 0.5f);
  float* dev_cos = Upload(cos);
  float* dev_sin = Upload(sin);
  std::vector<uint32_t> positions(tokens);
  std::iota(positions.begin(), positions.end(), 0u);
  uint32_t* dev_positions = Upload(positions);
  auto* rebuilt = static_cast<float*>(Alloc(tokens * row * 4));
  Record(stream, "Fetch: reconstruct + RoPE + scatter (K and V)", tokens,
         TimeMs(stream,
                [&] {
                  for (int plane = 0; plane < 2; ++plane) {
                    CHECK_OK(ReconstructCodebookCuda(unit, entries, dev_refs, magnitude,
                                                     tokens * kKvHeads, kDim, rebuilt, stream));
                  }
                  CHECK_OK(RotateRowsCuda(RopePairing::kHalfSplit, kDim, kDim / 2, dev_cos, dev_sin,
                                          tokens, dev_positions, tokens, kKvHeads, rebuilt, false,
                                          stream));
                  CHECK_OK(ScatterTokensF32Cuda(layout, KvElemType::kBf16, layer, dev_slots, tokens,
                                                rebuilt, rebuilt, stream));
                }),
         2.0 * 2.0 * tokens * layout.token_bytes());

  for (void* p :
       std::vector<void*>{layer,        dev_slots, dev_table, src_k,     src_v,         keys,
                          values,       dev_kept,  scratch,   dev_q,     sums,          att_scratch,
                          rank_scratch, ranked,    unit,      magnitude, nonzero,       finite,
                          adjacency,    dev_refs,  dev_cos,   dev_sin,   dev_positions, rebuilt}) {
    CHECK_CUDA(cudaFree(p));
  }
}

}  // namespace
}  // namespace cachemgr::kernels

int main(int argc, char** argv) {
  using namespace cachemgr::kernels;
  std::string json_path;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf(
          "usage: cachemgr_bench_gpu [--json=FILE]\n"
          "Times the CUDA kernels on device 0 against a device-to-device copy of the same bytes\n"
          "(Llama-3-8B-shaped layers at 4k/16k/32k tokens); prints a markdown table, and the\n"
          "rows as JSON to FILE. Without a device it says so and measures nothing.\n");
      return 0;
    }
    if (arg.rfind("--json=", 0) == 0) json_path = arg.substr(7);
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: nothing measured\n");
    return 0;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  std::mt19937 rng(7);
  for (uint32_t tokens : {4096u, 16384u, 32768u}) BenchSequence(stream, tokens, rng);

  std::printf(
      "device: %s\n\n| op | tokens | ms | GB/s | memcpy GB/s | ratio |\n"
      "|---|---:|---:|---:|---:|---:|\n",
      prop.name);
  for (const Row& r : rows) {
    if (r.bytes > 0) {
      const double gbs = r.bytes / (r.ms * 1e6);
      const double copy = r.bytes / (r.memcpy_ms * 1e6);
      std::printf("| %s | %u | %.3f | %.0f | %.0f | %.2f |\n", r.name.c_str(), r.tokens, r.ms, gbs,
                  copy, gbs / copy);
    } else {
      std::printf("| %s | %u | %.3f | | | |\n", r.name.c_str(), r.tokens, r.ms);
    }
  }
  // Device stages of one layer's SpindleKV compression, times the 32 layers (the greedy rounds
  // of Algorithm 1 and the host-side merges are not included).
  std::printf(
      "\n| tokens | gather + scores + ranking + codebook graph per layer (ms) | x %u layers (ms) "
      "|\n"
      "|---:|---:|---:|\n",
      kLayers);
  for (uint32_t tokens : {4096u, 16384u, 32768u}) {
    double per_layer = 0;
    for (const Row& r : rows) {
      if (r.tokens != tokens) continue;
      if (r.name.rfind("gather", 0) == 0 || r.name.rfind("window", 0) == 0 ||
          r.name.rfind("top-k", 0) == 0 || r.name.rfind("codebook", 0) == 0) {
        per_layer += r.ms;
      }
    }
    std::printf("| %u | %.3f | %.1f |\n", tokens, per_layer, per_layer * kLayers);
  }
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (f != nullptr) {
      std::fprintf(f, "{\"device\": \"%s\", \"rows\": [", prop.name);
      for (size_t i = 0; i < rows.size(); ++i) {
        std::fprintf(f,
                     "%s{\"op\": \"%s\", \"tokens\": %u, \"ms\": %.6f, \"bytes\": %.0f, "
                     "\"memcpy_ms\": %.6f}",
                     i ? ", " : "", rows[i].name.c_str(), rows[i].tokens, rows[i].ms, rows[i].bytes,
                     rows[i].memcpy_ms);
      }
      std::fprintf(f, "]}\n");
      std::fclose(f);
    }
  }
  return 0;
}
