// The two KV digests a host pool takes (PoolMemory::DigestLayer) over one stored block of
// SmolLM2-135M as vLLM hands it to the prefix store: 128 tokens x 3 KV heads x 64 dims, float32,
// K and V (196 KiB per layer): FNV-1a 64 (the client-visible kv_digest) against XXH3-64 (the
// prefix store's integrity check), and memcpy of the same bytes. Bytes per second in the report.
#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

#include "cachemgr/backend/host_backend.h"

namespace cachemgr {
namespace {

constexpr uint32_t kBlocks = 64, kBlockSize = 128, kKvHeads = 3, kDim = 64;

kernels::KvLayerLayout Layout() {
  kernels::KvLayerLayout layout;
  layout.num_blocks = kBlocks;
  layout.block_size = kBlockSize;
  layout.num_kv_heads = kKvHeads;
  layout.head_dim = kDim;
  layout.elem_bytes = 4;
  return layout;
}

void BM_DigestBlock(benchmark::State& state) {
  const auto kind = static_cast<KvDigest>(state.range(0));
  HostBackend backend;
  auto pool = backend.CreatePool("bench", Layout(), kernels::KvElemType::kF32, 1);
  if (!pool.ok()) {
    state.SkipWithError(pool.status().ToString().c_str());
    return;
  }
  std::vector<int64_t> slots(kBlockSize);
  for (uint32_t t = 0; t < kBlockSize; ++t) slots[t] = int64_t{7} * kBlockSize + t;
  std::vector<float> rows(size_t{kBlockSize} * kKvHeads * kDim);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<float>(i % 1013) * 0.001f;
  if (!(*pool)->ScatterTokens(0, slots, rows.data(), rows.data()).ok()) {
    state.SkipWithError("scatter failed");
    return;
  }
  const uint32_t block = 7;
  for (auto _ : state) {
    benchmark::DoNotOptimize((*pool)->DigestLayer(0, {&block, 1}, kBlockSize, kind));
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * 2 * rows.size() * sizeof(float));
  state.SetLabel(kind == KvDigest::kXxh3 ? "xxh3" : "fnv1a64");
}

void BM_MemcpyBlock(benchmark::State& state) {
  const size_t bytes = 2 * size_t{kBlockSize} * kKvHeads * kDim * sizeof(float);
  std::vector<char> from(bytes, 1), to(bytes);
  for (auto _ : state) {
    std::memcpy(to.data(), from.data(), bytes);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * bytes);
}

BENCHMARK(BM_DigestBlock)->Arg(static_cast<int>(KvDigest::kFnv1a64));
BENCHMARK(BM_DigestBlock)->Arg(static_cast<int>(KvDigest::kXxh3));
BENCHMARK(BM_MemcpyBlock);

}  // namespace
}  // namespace cachemgr

BENCHMARK_MAIN();
