// The compression kernels on the GPU against their CPU twins, on fresh seeded random inputs
// with poisoned outputs: token gather / scatter / compaction (bytes exactly), RoPE rows and the
// codebook stages (bit for bit: the device repeats the CPU's float arithmetic), top-k rankings
// (indices exactly) and attention column sums (relative 1e-4: a different exp). Without a CUDA
// device every case says so and checks nothing; the launchers' argument checks run everywhere.
#include <cuda_runtime.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "cachemgr/compress/codebook.h"
#include "cachemgr/compress/codebook_graph.h"
#include "cachemgr/compress/rope.h"
#include "cachemgr/compress/scoring.h"
#include "cachemgr/compress/selection.h"
#include "cachemgr/kernels/kv_layout.h"
#include "kernels/cpu/token_rows.h"
#include "kernels/cuda/attention_scores.h"
#include "kernels/cuda/codebook_graph.h"
#include "kernels/cuda/rank_topk.h"
#include "kernels/cuda/rope_rows.h"
#include "kernels/cuda/token_rows.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace cachemgr::kernels {
namespace {

using testing::DeviceBuffer;
using testing::FillRandom;
using testing::FromDevice;
using testing::HaveCudaDevice;
using testing::ToDevice;

template <typename T>
bool SameBits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

std::vector<float> Normal(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

KvLayerLayout Layout(KvOrder order, uint32_t heads, uint32_t dim, KvElemType type) {
  KvLayerLayout l;
  l.order = order;
  l.num_blocks = 20;
  l.block_size = 16;
  l.num_kv_heads = heads;
  l.head_dim = dim;
  l.elem_bytes = type == KvElemType::kF32 ? 4 : 2;
  return l;
}

class Stream {
 public:
  Stream() { REQUIRE(cudaStreamCreate(&stream_) == cudaSuccess); }
  ~Stream() { cudaStreamDestroy(stream_); }
  cudaStream_t get() const { return stream_; }
  void Sync() const { REQUIRE(cudaStreamSynchronize(stream_) == cudaSuccess); }

 private:
  cudaStream_t stream_ = nullptr;
};

TEST_CASE("token gather, scatter and compaction match the CPU twins byte for byte", "[gpu]") {
  if (!HaveCudaDevice()) {
    SUCCEED();
    return;
  }
  Stream stream;
  std::mt19937 rng(0x70CE);
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    for (KvElemType type : {KvElemType::kF16, KvElemType::kBf16, KvElemType::kF32}) {
      for (uint32_t dim : {8u, 64u, 128u}) {
        CAPTURE(static_cast<int>(order), static_cast<int>(type), dim);
        const KvLayerLayout l = Layout(order, 2, dim, type);
        const size_t bytes = l.layer_bytes();
        const size_t row = size_t{l.num_kv_heads} * dim;
        const int64_t num_slots = int64_t{l.num_blocks} * l.block_size;
        std::vector<std::byte> layer(bytes);
        FillRandom(layer, rng);
        DeviceBuffer dev_layer(bytes);
        ToDevice(dev_layer, layer);

        // Gather 100 random slots (repeats allowed).
        std::vector<int64_t> slots(100);
        for (int64_t& s : slots) s = static_cast<int64_t>(rng() % num_slots);
        std::vector<float> keys(slots.size() * row), values(slots.size() * row);
        REQUIRE(GatherTokensF32Cpu(l, type, layer.data(), slots, keys.data(), values.data()).ok());
        DeviceBuffer dev_slots(slots.size() * sizeof(int64_t));
        ToDevice(dev_slots, slots);
        DeviceBuffer dev_keys(keys.size() * 4), dev_values(values.size() * 4);
        REQUIRE(GatherTokensF32Cuda(l, type, dev_layer.get(), dev_slots.as<int64_t>(),
                                    static_cast<uint32_t>(slots.size()), dev_keys.as<float>(),
                                    dev_values.as<float>(), stream.get())
                    .ok());
        stream.Sync();
        CHECK(SameBits(FromDevice<float>(dev_keys, keys.size()), keys));
        CHECK(SameBits(FromDevice<float>(dev_values, values.size()), values));

        // Scatter normal floats (rounded to the pool type) into 90 distinct slots.
        std::vector<int64_t> perm(num_slots);
        std::iota(perm.begin(), perm.end(), int64_t{0});
        std::shuffle(perm.begin(), perm.end(), rng);
        std::vector<int64_t> targets(perm.begin(), perm.begin() + 90);
        const std::vector<float> new_keys = Normal(targets.size() * row, rng, 3.0f);
        const std::vector<float> new_values = Normal(targets.size() * row, rng, 3.0f);
        REQUIRE(
            ScatterTokensF32Cpu(l, type, layer.data(), targets, new_keys.data(), new_values.data())
                .ok());
        DeviceBuffer dev_targets(targets.size() * sizeof(int64_t));
        ToDevice(dev_targets, targets);
        DeviceBuffer dev_new_keys(new_keys.size() * 4), dev_new_values(new_values.size() * 4);
        ToDevice(dev_new_keys, new_keys);
        ToDevice(dev_new_values, new_values);
        REQUIRE(ScatterTokensF32Cuda(l, type, dev_layer.get(), dev_targets.as<int64_t>(),
                                     static_cast<uint32_t>(targets.size()),
                                     dev_new_keys.as<float>(), dev_new_values.as<float>(),
                                     stream.get())
                    .ok());
        stream.Sync();
        CHECK(FromDevice(dev_layer.get(), bytes) == layer);

        // Compaction of 150 tokens to a random ascending subset per head.
        const uint32_t num_tokens = 150, rows = 61;
        std::vector<uint32_t> table(l.num_blocks);
        std::iota(table.begin(), table.end(), 0u);
        std::shuffle(table.begin(), table.end(), rng);
        table.resize((num_tokens + l.block_size - 1) / l.block_size);
        std::vector<uint32_t> kept;
        for (uint32_t h = 0; h < l.num_kv_heads; ++h) {
          std::vector<uint32_t> tokens(num_tokens);
          std::iota(tokens.begin(), tokens.end(), 0u);
          std::shuffle(tokens.begin(), tokens.end(), rng);
          tokens.resize(rows);
          std::sort(tokens.begin(), tokens.end());
          kept.insert(kept.end(), tokens.begin(), tokens.end());
        }
        REQUIRE(CompactHeadsCpu(l, layer.data(), table, num_tokens, kept, rows).ok());
        DeviceBuffer dev_table(table.size() * 4), dev_kept(kept.size() * 4);
        ToDevice(dev_table, table);
        ToDevice(dev_kept, kept);
        DeviceBuffer scratch(CompactHeadsScratchBytes(l, rows));
        REQUIRE(CompactHeadsCuda(l, dev_layer.get(), dev_table.as<uint32_t>(),
                                 dev_kept.as<uint32_t>(), rows, scratch.get(), stream.get())
                    .ok());
        stream.Sync();
        CHECK(FromDevice(dev_layer.get(), bytes) == layer);
      }
    }
  }
}

TEST_CASE("RotateRowsCuda matches compress::RotateRows bit for bit", "[gpu]") {
  if (!HaveCudaDevice()) {
    SUCCEED();
    return;
  }
  Stream stream;
  std::mt19937 rng(0x20BE);
  for (compress::RopeStyle style :
       {compress::RopeStyle::kInterleaved, compress::RopeStyle::kHalfSplit}) {
    for (uint32_t rotary : {0u, 32u}) {
      for (bool inverse : {false, true}) {
        CAPTURE(static_cast<int>(style), rotary, inverse);
        compress::RopeParams params;
        params.style = style;
        params.theta = 500000.0;
        params.head_dim = 64;
        params.rotary_dim = rotary;
        std::vector<uint32_t> positions(300);
        for (uint32_t& p : positions) p = rng() % 8192;
        const compress::RopeAngles angles = compress::ComputeRopeAngles(params, positions);
        const uint32_t rows = 200, heads = 3;
        std::vector<uint32_t> angle_row(rows);
        for (uint32_t& r : angle_row) r = rng() % positions.size();
        std::vector<float> x = Normal(size_t{rows} * heads * params.head_dim, rng);
        DeviceBuffer dev_x(x.size() * 4), dev_cos(angles.cos.size() * 4),
            dev_sin(angles.sin.size() * 4), dev_rows(rows * 4);
        ToDevice(dev_x, x);
        ToDevice(dev_cos, angles.cos);
        ToDevice(dev_sin, angles.sin);
        ToDevice(dev_rows, angle_row);
        compress::RotateRows(params, angles, angle_row, heads, absl::MakeSpan(x), inverse);
        REQUIRE(RotateRowsCuda(
                    style == compress::RopeStyle::kInterleaved ? RopePairing::kInterleaved
                                                               : RopePairing::kHalfSplit,
                    params.head_dim, angles.num_pairs, dev_cos.as<float>(), dev_sin.as<float>(),
                    static_cast<uint32_t>(positions.size()), dev_rows.as<uint32_t>(), rows, heads,
                    dev_x.as<float>(), inverse, stream.get())
                    .ok());
        stream.Sync();
        CHECK(SameBits(FromDevice<float>(dev_x, x.size()), x));
      }
    }
  }
}

TEST_CASE("AttentionColumnSumsCuda matches the CPU's sums within 1e-4", "[gpu]") {
  if (!HaveCudaDevice()) {
    SUCCEED();
    return;
  }
  Stream stream;
  std::mt19937 rng(0xA77);
  struct Shape {
    uint32_t tokens, q_heads, kv_heads, dim, queries;
  };
  for (const Shape& s : {Shape{100, 8, 2, 64, 16}, Shape{1000, 4, 4, 8, 32},
                         Shape{777, 9, 3, 64, 33}, Shape{40, 32, 8, 128, 40}}) {
    CAPTURE(s.tokens, s.q_heads, s.kv_heads, s.dim, s.queries);
    const std::vector<float> keys = Normal(size_t{s.tokens} * s.kv_heads * s.dim, rng, 1.5f);
    const std::vector<float> queries = Normal(size_t{s.queries} * s.q_heads * s.dim, rng, 1.5f);
    compress::ModelShape shape;
    shape.num_layers = 1;
    shape.num_q_heads = s.q_heads;
    shape.num_kv_heads = s.kv_heads;
    shape.head_dim = s.dim;
    std::vector<float> want;
    compress::AttentionColumnSums(shape, s.tokens, keys.data(), queries.data(), s.queries, &want);
    AttentionShape gpu{s.tokens, s.q_heads, s.kv_heads, s.dim, s.queries};
    DeviceBuffer dev_keys(keys.size() * 4), dev_queries(queries.size() * 4),
        dev_sums(want.size() * 4), scratch(AttentionScratchBytes(gpu));
    ToDevice(dev_keys, keys);
    ToDevice(dev_queries, queries);
    REQUIRE(AttentionColumnSumsCuda(gpu, dev_keys.as<float>(), dev_queries.as<float>(),
                                    dev_sums.as<float>(), scratch.get(), stream.get())
                .ok());
    stream.Sync();
    const std::vector<float> got = FromDevice<float>(dev_sums, want.size());
    double worst = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      worst = std::max(worst, std::abs(double{got[i]} - want[i]) / (std::abs(want[i]) + 1e-6));
    }
    CHECK(worst < 1e-4);
  }
  AttentionShape bad{10, 6, 4, 8, 2};
  CHECK(AttentionColumnSumsCuda(bad, nullptr, nullptr, nullptr, nullptr, nullptr).code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE("RankTopKCuda ranks exactly as compress::RankTopK, ties included", "[gpu]") {
  if (!HaveCudaDevice()) {
    SUCCEED();
    return;
  }
  Stream stream;
  std::mt19937 rng(0x70B);
  for (uint32_t context : {1u, 31u, 1000u, 5000u}) {
    const uint32_t heads = 12;
    std::vector<float> scores(size_t{heads} * context);
    for (float& x : scores) x = static_cast<float>(rng() % 50) / 8.0f;  // many ties
    scores[0] = -0.0f;
    scores[scores.size() / 2] = std::numeric_limits<float>::quiet_NaN();
    scores[scores.size() - 1] = -std::numeric_limits<float>::infinity();
    for (uint32_t k : {context, context / 2 + 1, 1u}) {
      CAPTURE(context, k);
      DeviceBuffer dev_scores(scores.size() * 4), dev_ranked(size_t{heads} * k * 4),
          scratch(RankTopKScratchBytes(heads, context));
      ToDevice(dev_scores, scores);
      REQUIRE(RankTopKCuda(dev_scores.as<float>(), heads, context, k, dev_ranked.as<uint32_t>(),
                           scratch.get(), scratch.bytes(), stream.get())
                  .ok());
      stream.Sync();
      const std::vector<uint32_t> got = FromDevice<uint32_t>(dev_ranked, size_t{heads} * k);
      for (uint32_t h = 0; h < heads; ++h) {
        // The CPU ranks NaN as -infinity (scoring maps it so before selection).
        std::vector<float> row(scores.begin() + size_t{h} * context,
                               scores.begin() + size_t{h + 1} * context);
        for (float& x : row) {
          if (std::isnan(x)) x = -std::numeric_limits<float>::infinity();
        }
        std::vector<uint32_t> want;
        compress::RankTopK(row, k, &want);
        CHECK(std::equal(want.begin(), want.end(), got.begin() + size_t{h} * k));
      }
    }
  }
  CHECK(RankTopKCuda(nullptr, 2, 4, 5, nullptr, nullptr, 0, nullptr).code() ==
        absl::StatusCode::kInvalidArgument);
}

// Vectors around a few random centres (angular noise), a zero vector and exact duplicates.
std::vector<float> Clustered(uint32_t n, uint32_t dim, std::mt19937& rng, float noise) {
  const uint32_t centres = 12;
  const std::vector<float> c = Normal(size_t{centres} * dim, rng);
  std::normal_distribution<float> jitter(0.0f, noise);
  std::uniform_real_distribution<float> scale(0.5f, 4.0f);
  std::vector<float> v(size_t{n} * dim);
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t centre = rng() % centres;
    const float m = scale(rng);
    for (uint32_t k = 0; k < dim; ++k) {
      v[size_t{i} * dim + k] = m * (c[size_t{centre} * dim + k] + jitter(rng));
    }
  }
  std::fill_n(v.begin() + size_t{3} * dim, dim, 0.0f);
  std::copy_n(v.begin() + size_t{5} * dim, dim, v.begin() + size_t{6} * dim);
  return v;
}

TEST_CASE("codebook stages on the GPU match the CPU bit for bit", "[gpu]") {
  if (!HaveCudaDevice()) {
    SUCCEED();
    return;
  }
  Stream stream;
  std::mt19937 rng(0xC0DE);
  struct Shape {
    uint32_t n, dim;
    float theta, noise;
  };
  for (const Shape& s :
       {Shape{700, 64, 0.98f, 0.05f}, Shape{700, 64, 0.9f, 0.2f}, Shape{1500, 8, 0.98f, 0.1f},
        Shape{130, 128, 0.95f, 0.1f}, Shape{257, 129, 1.0f, 0.0f}}) {
    CAPTURE(s.n, s.dim, s.theta);
    const std::vector<float> x = Clustered(s.n, s.dim, rng, s.noise);
    const size_t words = (s.n + 63) / 64;

    // Eq. 8.
    std::vector<float> unit(x.size()), magnitude(s.n);
    std::vector<uint8_t> nonzero(s.n);
    for (uint32_t i = 0; i < s.n; ++i) {
      REQUIRE(compress::NormalizeVector(&x[size_t{i} * s.dim], s.dim, &unit[size_t{i} * s.dim],
                                        &magnitude[i]));
      nonzero[i] = magnitude[i] > 0.0f;
    }
    DeviceBuffer dev_x(x.size() * 4), dev_unit(x.size() * 4), dev_m(s.n * 4), dev_nz(s.n),
        dev_finite(s.n), dev_adj(s.n * words * 8);
    ToDevice(dev_x, x);
    REQUIRE(NormalizeRowsCuda(dev_x.as<float>(), s.n, s.dim, dev_unit.as<float>(),
                              dev_m.as<float>(), dev_nz.as<uint8_t>(), dev_finite.as<uint8_t>(),
                              stream.get())
                .ok());
    stream.Sync();
    CHECK(SameBits(FromDevice<float>(dev_unit, unit.size()), unit));
    CHECK(SameBits(FromDevice<float>(dev_m, s.n), magnitude));
    CHECK(FromDevice<uint8_t>(dev_nz, s.n) == nonzero);
    CHECK(FromDevice<uint8_t>(dev_finite, s.n) == std::vector<uint8_t>(s.n, 1));

    // Eq. 9: the adjacency bitsets, then the codebook built from the GPU's.
    std::vector<uint64_t> adjacency(s.n * words, 0);
    compress::SimilarityAdjacency(unit.data(), nonzero.data(), s.n, s.dim, s.theta,
                                  adjacency.data());
    REQUIRE(SimilarityAdjacencyCuda(dev_unit.as<float>(), dev_nz.as<uint8_t>(), s.n, s.dim, s.theta,
                                    dev_adj.as<uint64_t>(), stream.get())
                .ok());
    stream.Sync();
    const std::vector<uint64_t> gpu_adjacency = FromDevice<uint64_t>(dev_adj, adjacency.size());
    CHECK(gpu_adjacency == adjacency);
    std::vector<uint32_t> refs;
    const std::vector<uint32_t> picks =
        compress::GreedyCoverRounds(s.n, gpu_adjacency.data(), &refs);
    absl::StatusOr<compress::Codebook> want = compress::BuildCodebook(x, s.dim, s.theta);
    REQUIRE(want.ok());
    CHECK(refs == want->refs);
    REQUIRE(picks.size() == want->size());
    CHECK(want->size() < s.n);  // the clusters merged: the test exercised real edges

    // Eq. 14.
    std::vector<float> out(x.size());
    compress::ReconstructCodebook(*want, absl::MakeSpan(out));
    DeviceBuffer dev_entries(want->entries.size() * 4), dev_refs(s.n * 4), dev_out(x.size() * 4);
    ToDevice(dev_entries, want->entries);
    ToDevice(dev_refs, want->refs);
    ToDevice(dev_m, want->magnitudes);
    REQUIRE(ReconstructCodebookCuda(dev_entries.as<float>(), want->size(), dev_refs.as<uint32_t>(),
                                    dev_m.as<float>(), s.n, s.dim, dev_out.as<float>(),
                                    stream.get())
                .ok());
    stream.Sync();
    CHECK(SameBits(FromDevice<float>(dev_out, out.size()), out));
  }
}

TEST_CASE("compression launchers reject bad arguments before touching the device") {
  const KvLayerLayout l = Layout(KvOrder::kFlashAttn, 2, 64, KvElemType::kF16);
  CHECK(GatherTokensF32Cuda(l, KvElemType::kF32, nullptr, nullptr, 1, nullptr, nullptr, nullptr)
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(GatherTokensF32Cuda(l, KvElemType::kF16, nullptr, nullptr, 1, nullptr, nullptr, nullptr)
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(ScatterTokensF32Cuda(l, KvElemType::kF16, nullptr, nullptr, 0, nullptr, nullptr, nullptr)
            .ok());
  CHECK(CompactHeadsCuda(l, nullptr, nullptr, nullptr, 3, nullptr, nullptr).code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(RotateRowsCuda(RopePairing::kHalfSplit, 8, 5, nullptr, nullptr, 1, nullptr, 1, 1, nullptr,
                       false, nullptr)
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(SimilarityAdjacencyCuda(nullptr, nullptr, 4, 8, 1.5f, nullptr, nullptr).code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(NormalizeRowsCuda(nullptr, 4, 0, nullptr, nullptr, nullptr, nullptr, nullptr).code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(RankTopKCuda(nullptr, 1, 3, 4, nullptr, nullptr, 0, nullptr).code() ==
        absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace cachemgr::kernels
