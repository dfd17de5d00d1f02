// What tensor-parallel groups cost on the host (docs/MULTINODE.md, "Groups"): the same work on an
// unsharded pool (ranks = 1) and on a group's pool of 2, 4 and 8 ranks (ShardedPoolMemory over
// host memory), one layer of a Llama-3-8B-shaped model (32 query heads, 8 KV heads, head_dim
// 128, bf16, blocks of 16), 4096 tokens:
//   BM_GatherRows    every row of the layer read as float32 (what Compress, Park and transfers
//                    read): the shards' rows joined by head;
//   BM_Compress      Compress of a 4-layer sequence (SnapKV from 32 window queries, reserve
//                    0.3) through CacheManager: input buffers joined by head, scoring per shard,
//                    compaction per shard. (A codebook policy adds the same row reads as
//                    BM_GatherRows to a build that dominates: tens of seconds on noise at this
//                    size, issue #15.)
// Ratios against ranks = 1 are what docs/MULTINODE.md reports.
#include <benchmark/benchmark.h>

#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "cachemgr/backend/host_backend.h"
#include "cachemgr/backend/sharded_pool_memory.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/util/clock.h"

namespace cachemgr {
namespace {

constexpr uint32_t kQHeads = 32, kKvHeads = 8, kDim = 128, kBlock = 16, kTokens = 4096;
constexpr uint32_t kBlocks = kTokens / kBlock + 8, kLayers = 4, kQueries = 32;

kernels::KvLayerLayout ShardLayout(uint32_t ranks) {
  kernels::KvLayerLayout layout;
  layout.num_blocks = kBlocks;
  layout.block_size = kBlock;
  layout.num_kv_heads = kKvHeads / ranks;
  layout.head_dim = kDim;
  layout.elem_bytes = 2;
  return layout;
}

void BM_GatherRows(benchmark::State& state) {
  const auto ranks = static_cast<uint32_t>(state.range(0));
  HostBackend backend;
  std::unique_ptr<PoolMemory> memory;
  if (ranks == 1) {
    memory = *backend.CreatePool("bench", ShardLayout(1), kernels::KvElemType::kBf16, 1);
  } else {
    std::vector<std::unique_ptr<PoolMemory>> shards;
    for (uint32_t r = 0; r < ranks; ++r) {
      shards.push_back(
          *backend.CreatePool("bench", ShardLayout(ranks), kernels::KvElemType::kBf16, 1));
    }
    memory = *ShardedPoolMemory::Create(std::move(shards));
  }
  std::vector<int64_t> slots(kTokens);
  for (uint32_t t = 0; t < kTokens; ++t) slots[t] = t;
  std::vector<float> keys(size_t{kTokens} * kKvHeads * kDim), values(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) keys[i] = values[i] = static_cast<float>(i % 97);
  if (!memory->ScatterTokens(0, slots, keys.data(), values.data()).ok()) {
    state.SkipWithError("scatter failed");
    return;
  }
  for (auto _ : state) {
    if (!memory->GatherTokens(0, slots, keys.data(), values.data()).ok()) {
      state.SkipWithError("gather failed");
      return;
    }
    benchmark::DoNotOptimize(keys.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * kTokens * kKvHeads * kDim * 2 * 2);
}
BENCHMARK(BM_GatherRows)->Arg(1)->Arg(2)->Arg(4)->Arg(8)->Unit(benchmark::kMillisecond);

// One engine of `ranks` ranks attached to a manager, every rank's shard and input buffer mapped.
struct Engine {
  explicit Engine(uint32_t ranks) : manager(Options(), &backend, &clock, nullptr) {
    for (uint32_t r = 0; r < ranks; ++r) {
      AttachParams p;
      p.client_name = "rank" + std::to_string(r);
      p.model.name = "bench";
      p.model.num_layers = kLayers;
      p.model.num_q_heads = kQHeads;
      p.model.num_kv_heads = kKvHeads;
      p.model.head_dim = kDim;
      p.model.dtype = DType::kBf16;
      p.model.block_size = kBlock;
      p.num_blocks = kBlocks;
      if (ranks > 1) p.group = GroupMembership{"tp", r, ranks, {}};
      AttachResult a = *manager.Attach(p);
      auto fds = *manager.ShareFds(a.session_token);
      pools.push_back(*MemfdRegion::Map(std::move(fds[0]), a.pool.regions[0].bytes));
      inputs.push_back(*MemfdRegion::Map(std::move(fds[1]), a.input_buffer_bytes));
      tokens.push_back(a.session_token);
    }
  }
  static CacheManagerOptions Options() {
    CacheManagerOptions o;
    o.memory_budget_bytes = uint64_t{4} << 30;
    o.compress_threads = 1;
    return o;
  }
  // Fills every rank's pool (so the sequence's rows) and window queries with noise.
  void Fill(uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<uint16_t> bits(0x3c00, 0x3f80);  // bf16 in ~[0.008, 1]
    for (size_t r = 0; r < pools.size(); ++r) {
      auto* p = reinterpret_cast<uint16_t*>(pools[r].data());
      for (size_t i = 0; i < pools[r].size() / 2; ++i) p[i] = bits(rng);
      std::normal_distribution<float> normal;
      auto* q = reinterpret_cast<float*>(inputs[r].data());
      const size_t n = size_t{kLayers} * kQueries * (kQHeads / pools.size()) * kDim;
      for (size_t i = 0; i < n; ++i) q[i] = normal(rng);
    }
  }
  HostBackend backend;
  FakeClock clock;
  CacheManager manager;
  std::vector<MemfdRegion> pools, inputs;
  std::vector<std::string> tokens;
};

void BM_Compress(benchmark::State& state) {
  const auto ranks = static_cast<uint32_t>(state.range(0));
  Engine engine(ranks);
  CompressParams params;
  params.policy = *ResolvePreset("snapkv");
  params.policy.window = kQueries;
  params.target = {compress::TargetKind::kReserveRatio, 0.3};
  params.input = CompressInput::kWindowQueries;
  params.num_queries = kQueries;
  uint32_t n = 0;
  for (auto _ : state) {
    state.PauseTiming();
    const std::string id = "s" + std::to_string(n++);
    if (!engine.manager.Allocate(engine.tokens[0], id, kTokens).ok()) {
      state.SkipWithError("allocate failed");
      return;
    }
    engine.Fill(n);
    state.ResumeTiming();
    auto r = engine.manager.Compress(engine.tokens.back(), id, params);
    state.PauseTiming();
    if (!r.ok()) {
      state.SkipWithError(r.status().ToString().c_str());
      return;
    }
    (void)engine.manager.Free(engine.tokens[0], id);
    state.ResumeTiming();
  }
}
BENCHMARK(BM_Compress)->Arg(1)->Arg(2)->Arg(4)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace cachemgr

BENCHMARK_MAIN();
