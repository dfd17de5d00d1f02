// NCCL between device pools (docs/MULTINODE.md), on a GPU: a one-rank communicator moves 256 MiB
// from one device buffer to another with a send to itself and a receive (what NCCL allows on one
// device), the bytes checked; with two or more GPUs, two ranks (one thread each) move the same
// bytes from device 0 to device 1. Each prints its bandwidth beside cudaMemcpy (one device) or
// cudaMemcpyPeer (two) of the same bytes, measured in the same run. Without a GPU only the
// argument checks run, and the cases say so.
#include "cachemgr/peers/nccl_comm.h"

#include <cuda_runtime.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

namespace cachemgr {
namespace {

constexpr size_t kBytes = size_t{256} << 20;

int DeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

// A pattern no two 8-byte words of the buffer share.
std::vector<uint64_t> Pattern() {
  std::vector<uint64_t> words(kBytes / 8);
  for (size_t i = 0; i < words.size(); ++i) words[i] = i * 0x9e3779b97f4a7c15ull + 1;
  return words;
}

double Seconds(const std::chrono::steady_clock::time_point& start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

TEST_CASE("NCCL communicator arguments are checked before NCCL sees them", "[gpu]") {
  CHECK(NcclComm::Init(0, 1, 0, "short").status().code() == absl::StatusCode::kInvalidArgument);
  const std::string id(NCCL_UNIQUE_ID_BYTES, '\0');
  auto outside = NcclComm::Init(0, 2, 2, id);
  REQUIRE(outside.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(outside.status().message()), Catch::Contains("rank 2"));
}

TEST_CASE("one GPU: a rank sends 256 MiB to itself, bytes intact", "[gpu]") {
  if (DeviceCount() < 1) {
    WARN("no CUDA device: the NCCL transfer was not run");
    return;
  }
  auto id = NcclComm::NewUniqueId();
  REQUIRE(id.ok());
  auto comm = NcclComm::Init(0, 1, 0, *id);
  REQUIRE(comm.ok());
  void* src = nullptr;
  void* dst = nullptr;
  REQUIRE(cudaMalloc(&src, kBytes) == cudaSuccess);
  REQUIRE(cudaMalloc(&dst, kBytes) == cudaSuccess);
  const std::vector<uint64_t> pattern = Pattern();
  REQUIRE(cudaMemcpy(src, pattern.data(), kBytes, cudaMemcpyHostToDevice) == cudaSuccess);
  REQUIRE(cudaMemset(dst, 0, kBytes) == cudaSuccess);
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  const NcclComm::Op ops[] = {{NcclComm::Op::Kind::kSend, src, kBytes, 0},
                              {NcclComm::Op::Kind::kRecv, dst, kBytes, 0}};
  REQUIRE(comm->Group(ops, stream).ok());  // warm-up
  REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
  REQUIRE(cudaMemset(dst, 0, kBytes) == cudaSuccess);
  auto start = std::chrono::steady_clock::now();
  REQUIRE(comm->Group(ops, stream).ok());
  REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
  const double nccl_s = Seconds(start);
  std::vector<uint64_t> back(pattern.size());
  REQUIRE(cudaMemcpy(back.data(), dst, kBytes, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(back == pattern);
  start = std::chrono::steady_clock::now();
  REQUIRE(cudaMemcpy(dst, src, kBytes, cudaMemcpyDeviceToDevice) == cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const double memcpy_s = Seconds(start);
  std::printf("NCCL self send/recv 256 MiB: %.1f GB/s; cudaMemcpy D2D: %.1f GB/s\n",
              kBytes / nccl_s / 1e9, kBytes / memcpy_s / 1e9);
  const NcclComm::Op bad[] = {{NcclComm::Op::Kind::kSend, src, kBytes, 1}};
  CHECK(comm->Group(bad, stream).code() == absl::StatusCode::kInvalidArgument);
  cudaStreamDestroy(stream);
  cudaFree(src);
  cudaFree(dst);
}

TEST_CASE("two GPUs: rank 0 sends 256 MiB to rank 1, bytes intact", "[gpu]") {
  if (DeviceCount() < 2) {
    WARN("fewer than two CUDA devices: the two-rank NCCL transfer was not run");
    return;
  }
  auto id = NcclComm::NewUniqueId();
  REQUIRE(id.ok());
  const std::vector<uint64_t> pattern = Pattern();
  void* buffers[2] = {nullptr, nullptr};
  for (int d = 0; d < 2; ++d) {
    REQUIRE(cudaSetDevice(d) == cudaSuccess);
    REQUIRE(cudaMalloc(&buffers[d], kBytes) == cudaSuccess);
  }
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  REQUIRE(cudaMemcpy(buffers[0], pattern.data(), kBytes, cudaMemcpyHostToDevice) == cudaSuccess);
  absl::Status status[2];
  double seconds[2] = {0, 0};
  auto rank = [&](int r) {
    auto comm = NcclComm::Init(r, 2, r, *id);
    if (!comm.ok()) {
      status[r] = comm.status();
      return;
    }
    cudaStream_t stream = nullptr;
    cudaStreamCreate(&stream);
    const NcclComm::Op op = {r == 0 ? NcclComm::Op::Kind::kSend : NcclComm::Op::Kind::kRecv,
                             buffers[r], kBytes, 1 - r};
    for (int round = 0; round < 2 && status[r].ok(); ++round) {  // the first warms up
      const auto start = std::chrono::steady_clock::now();
      status[r] = comm->Group({&op, 1}, stream);
      if (cudaStreamSynchronize(stream) != cudaSuccess) status[r] = absl::InternalError("sync");
      seconds[r] = Seconds(start);
    }
    cudaStreamDestroy(stream);
  };
  std::thread t0(rank, 0), t1(rank, 1);
  t0.join();
  t1.join();
  REQUIRE(status[0].ok());
  REQUIRE(status[1].ok());
  std::vector<uint64_t> back(pattern.size());
  REQUIRE(cudaSetDevice(1) == cudaSuccess);
  REQUIRE(cudaMemcpy(back.data(), buffers[1], kBytes, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(back == pattern);
  const auto start = std::chrono::steady_clock::now();
  REQUIRE(cudaMemcpyPeer(buffers[1], 1, buffers[0], 0, kBytes) == cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  std::printf("NCCL send/recv GPU 0 -> 1, 256 MiB: %.1f GB/s; cudaMemcpyPeer: %.1f GB/s\n",
              kBytes / seconds[1] / 1e9, kBytes / Seconds(start) / 1e9);
  for (int d = 0; d < 2; ++d) cudaFree(buffers[d]);
}

}  // namespace
}  // namespace cachemgr
