// cachemgr_bench_gpu_compress: end-to-end Compress on a CUDA pool, as an engine sees it. The
// real cachemgrd (--backend=cuda) owns a Llama-3-8B-shaped pool (32 layers, 32 q / 8 KV heads,
// head_dim 128, bf16, block 16, RoPE theta 500000); this process attaches, writes random K/V
// with the slot-mapping kernel and 32 window queries per layer, and times the Compress RPC
// (steady clock, RPC included) against a cudaMemcpyAsync device-to-device copy of the
// sequence's KV bytes in the same run. docs/GPU.md records the results.
//
// The daemon scores tokens on the device (only the [32, n] score rows cross PCIe); a codebook
// policy also reads the rows to the host and builds its similarity graphs on the device.
//
//   cachemgr_bench_gpu_compress [--tokens=4096,16384,32768] [--codebook_tokens=4096]
//                               [--runs=3] [--json=FILE]
// The daemon binary is $CACHEMGRD (scripts/gpu-check.sh sets it) or the one built alongside.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cachemgr/client/client.h"
#include "cachemgr/kernels/elem_convert.h"
#include "kernels/cuda/write_kv.h"
#include "tests/support/daemon_process.h"

namespace {

using cachemgr::client::Session;
using Clock = std::chrono::steady_clock;

constexpr uint32_t kLayers = 32, kQHeads = 32, kKvHeads = 8, kDim = 128, kBlock = 16;
constexpr uint32_t kQueries = 32;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "cachemgr_bench_gpu_compress: %s\n", what.c_str());
  std::exit(1);
}

void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) Die(std::string(what) + ": " + cudaGetErrorString(e));
}

template <typename T>
T* Upload(const std::vector<T>& host) {
  void* p = nullptr;
  Check(cudaMalloc(&p, host.size() * sizeof(T)), "cudaMalloc");
  Check(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  return static_cast<T*>(p);
}

std::vector<uint32_t> ParseList(const std::string& s) {
  std::vector<uint32_t> out;
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    uint32_t v = 0;
    if (!absl::SimpleAtoi(part, &v) || v == 0) Die("bad list: " + s);
    out.push_back(v);
  }
  return out;
}

// Median milliseconds of a device-to-device copy of `bytes`.
double MemcpyMs(size_t bytes) {
  void *a = nullptr, *b = nullptr;
  Check(cudaMalloc(&a, bytes), "cudaMalloc");
  Check(cudaMalloc(&b, bytes), "cudaMalloc");
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<float> ms;
  for (int i = 0; i < 13; ++i) {
    cudaEventRecord(start);
    Check(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpyAsync");
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float t = 0;
    cudaEventElapsedTime(&t, start, stop);
    if (i >= 3) ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(a);
  cudaFree(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<uint32_t> token_counts = {4096, 16384, 32768};
  std::vector<uint32_t> codebook_tokens = {4096};
  int runs = 3;
  std::string json_path;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf(
          "usage: cachemgr_bench_gpu_compress [--tokens=4096,16384,32768] "
          "[--codebook_tokens=4096]\n"
          "                                   [--runs=3] [--json=FILE]\n"
          "Times the Compress RPC on a CUDA pool of a real cachemgrd (--backend=cuda, the binary\n"
          "in $CACHEMGRD or the one built alongside) against a device-to-device copy of the\n"
          "sequence's KV bytes. Without a device it says so and measures nothing.\n");
      return 0;
    }
    if (arg.rfind("--tokens=", 0) == 0) {
      token_counts = ParseList(arg.substr(9));
    } else if (arg.rfind("--codebook_tokens=", 0) == 0) {
      codebook_tokens = ParseList(arg.substr(18));
    } else if (arg.rfind("--runs=", 0) == 0) {
      runs = std::max(1, std::atoi(arg.c_str() + 7));
    } else if (arg.rfind("--json=", 0) == 0) {
      json_path = arg.substr(7);
    } else {
      Die("unknown argument " + arg);
    }
  }
  const uint32_t max_tokens = *std::max_element(token_counts.begin(), token_counts.end());
  const uint32_t num_blocks = max_tokens / kBlock + 64;
  absl::StatusOr<std::unique_ptr<cachemgr::testing::DaemonProcess>> daemon =
      cachemgr::testing::DaemonProcess::Start(
          {"--backend=cuda", "--memory_budget=64G", "--default_pool_bytes=64G"});
  if (!daemon.ok() && absl::StrContains(daemon.status().message(), "no CUDA device")) {
    std::printf("no CUDA device: nothing measured\n");
    return 0;
  }
  if (!daemon.ok()) Die(std::string(daemon.status().message()));

  cachemgr::client::AttachOptions options;
  options.client_name = "bench-engine";
  options.model.name = "llama-3-8b-shape";
  options.model.num_layers = kLayers;
  options.model.num_q_heads = kQHeads;
  options.model.num_kv_heads = kKvHeads;
  options.model.head_dim = kDim;
  options.model.dtype = cachemgr::client::DType::kBf16;
  options.model.block_size = kBlock;
  options.model.rope.style = cachemgr::client::RopeStyle::kHalfSplit;
  options.model.rope.theta = 500000.0;
  options.num_blocks = num_blocks;
  options.input_buffer_bytes = uint64_t{kLayers} * kQueries * kQHeads * kDim * sizeof(float);
  absl::StatusOr<std::unique_ptr<Session>> session =
      Session::Attach((*daemon)->socket_path(), options);
  if (!session.ok()) Die(std::string(session.status().message()));
  const cachemgr::client::KvPoolView& pool = (*session)->pool();

  // One random bf16 K and V image, written to every layer.
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> image(size_t{max_tokens} * kKvHeads * kDim);
  for (uint16_t& x : image) x = cachemgr::kernels::F32ToBf16(normal(rng));
  uint16_t* dev_k = Upload(image);
  for (uint16_t& x : image) x = cachemgr::kernels::F32ToBf16(normal(rng));
  uint16_t* dev_v = Upload(image);
  std::vector<float> queries(size_t{kLayers} * kQueries * kQHeads * kDim);
  for (float& x : queries) x = normal(rng);

  struct Row {
    std::string policy;
    uint32_t tokens;
    double compress_ms, memcpy_ms, honest_ratio;
    uint64_t blocks_released;
  };
  std::vector<Row> rows;
  std::printf(
      "| policy | tokens | Compress ms (median of %d) | D2D copy of the KV, ms | ratio | "
      "honest bytes | blocks released |\n|---|---|---|---|---|---|---|\n",
      runs);
  for (const std::string policy : {"streamingllm", "snapkv", "pyramidkv", "spindlekv"}) {
    const bool codebook = policy == "spindlekv";
    for (uint32_t n : codebook ? codebook_tokens : token_counts) {
      if (n > max_tokens) continue;
      const double copy_ms = MemcpyMs(size_t{kLayers} * n * kKvHeads * kDim * 2 * 2);
      std::vector<double> ms;
      Row row{policy, n, 0, copy_ms, 0, 0};
      for (int run = 0; run < runs; ++run) {
        absl::StatusOr<cachemgr::client::Allocation> alloc = (*session)->Allocate("seq", n);
        if (!alloc.ok()) Die(std::string(alloc.status().message()));
        for (uint32_t l = 0; l < kLayers; ++l) {
          int64_t* slots = Upload(alloc->layers[l].slot_mapping);
          absl::Status s = cachemgr::kernels::WriteKvBySlotCuda(
              pool.layout(), pool.layer_base(l), reinterpret_cast<const std::byte*>(dev_k),
              reinterpret_cast<const std::byte*>(dev_v), slots, n, nullptr);
          if (!s.ok()) Die(std::string(s.message()));
          Check(cudaDeviceSynchronize(), "write");  // the client's side of the ordering
          cudaFree(slots);
        }
        std::span<float> buffer = (*session)->input_buffer();
        std::copy(queries.begin(), queries.end(), buffer.begin());
        cachemgr::client::CompressOptions compress;
        compress.policy.preset = policy;
        compress.target = 0.3;
        compress.input = cachemgr::client::CompressInputSource::kWindowQueries;
        compress.num_queries = kQueries;
        const Clock::time_point start = Clock::now();
        absl::StatusOr<cachemgr::client::CompressResult> result =
            (*session)->Compress("seq", compress);
        const double elapsed =
            std::chrono::duration<double, std::milli>(Clock::now() - start).count();
        if (!result.ok()) Die(policy + ": " + std::string(result.status().message()));
        ms.push_back(elapsed);
        row.honest_ratio = result->honest_ratio;
        row.blocks_released = result->blocks_released;
        if (absl::StatusOr<uint64_t> freed = (*session)->Free("seq"); !freed.ok()) {
          Die(std::string(freed.status().message()));
        }
      }
      std::sort(ms.begin(), ms.end());
      row.compress_ms = ms[ms.size() / 2];
      std::printf("| %s | %u | %.2f | %.3f | %.1f | %.3f | %llu |\n", policy.c_str(), n,
                  row.compress_ms, copy_ms, row.compress_ms / copy_ms, row.honest_ratio,
                  static_cast<unsigned long long>(row.blocks_released));
      std::fflush(stdout);
      rows.push_back(row);
    }
  }
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (f == nullptr) Die("cannot write " + json_path);
    std::fprintf(f, "[\n");
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      std::fprintf(f,
                   "  {\"policy\": \"%s\", \"tokens\": %u, \"compress_ms\": %.4f, "
                   "\"memcpy_ms\": %.4f, \"honest_ratio\": %.5f, \"blocks_released\": %llu}%s\n",
                   r.policy.c_str(), r.tokens, r.compress_ms, r.memcpy_ms, r.honest_ratio,
                   static_cast<unsigned long long>(r.blocks_released),
                   i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(f, "]\n");
    std::fclose(f);
  }
  cudaFree(dev_k);
  cudaFree(dev_v);
  if (absl::Status s = (*session)->Detach(); !s.ok()) Die(std::string(s.message()));
  return 0;
}
