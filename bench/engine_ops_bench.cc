// CPU cost of the engine's dense loops (tools/engine/ops.h) on SmolLM2-135M's shapes, one thread,
// reported with thread CPU time as well as wall time (robust to other jobs on a shared machine).
//
//   BM_MatMul/rows/in/out   y = x W^T: rows 1 is a decode step, 16 a prefill chunk; in 576 and
//                           out 1536 are SmolLM2's hidden and MLP widths.
//   BM_Dot/n                one attention score (n = head_dim 64) or one longer dot product.
#include <benchmark/benchmark.h>

#include <ctime>
#include <random>
#include <vector>

#include "tools/engine/ops.h"
#include "tools/engine/thread_pool.h"

namespace {

double ThreadCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> out(n);
  for (float& x : out) x = normal(rng);
  return out;
}

void BM_MatMul(benchmark::State& state) {
  const auto rows = static_cast<size_t>(state.range(0));
  const auto in = static_cast<size_t>(state.range(1));
  const auto out = static_cast<size_t>(state.range(2));
  cachemgr::engine::ThreadPool pool(1);
  const std::vector<float> x = Random(rows * in, 1), w = Random(out * in, 2);
  std::vector<float> y(rows * out);
  const double cpu0 = ThreadCpuSeconds();
  for (auto _ : state) {
    cachemgr::engine::MatMul(pool, x.data(), rows, in, w.data(), out, y.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["cpu_us"] = 1e6 * (ThreadCpuSeconds() - cpu0) / state.iterations();
  state.counters["gflops"] = benchmark::Counter(2.0 * rows * in * out * state.iterations() / 1e9,
                                                benchmark::Counter::kIsRate);
}

void BM_Dot(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  const std::vector<float> a = Random(n, 3), b = Random(n, 4);
  const double cpu0 = ThreadCpuSeconds();
  for (auto _ : state) {
    float s = cachemgr::engine::Dot(a.data(), b.data(), n);
    benchmark::DoNotOptimize(s);
  }
  state.counters["cpu_ns"] = 1e9 * (ThreadCpuSeconds() - cpu0) / state.iterations();
}

}  // namespace

BENCHMARK(BM_MatMul)
    ->ArgNames({"rows", "in", "out"})
    ->Args({1, 576, 1536})
    ->Args({16, 576, 1536})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_Dot)->Arg(64)->Arg(576);

BENCHMARK_MAIN();
