// NCCL row links end to end, on GPUs (docs/MULTINODE.md, "Row links"): two real cachemgrd
// (--backend=cuda --row_links=nccl), peers over loopback TCP, a sequence of 128 MiB of fp16 rows
// written into A's pool with the slot-mapping kernel and transferred to B. With two GPUs (A on
// device 0, B on device 1) the rows take the NCCL link (row_link "nccl"), the second transfer
// reuses it, B's digests equal A's, and the link's rate is printed beside cudaMemcpyPeer and raw
// NCCL send/recv of the same bytes measured in the same run. With one GPU both daemons share it,
// which NCCL cannot link: B refuses the offer at the header and the rows take the stream (row_link
// empty), digests equal all the same. Without a CUDA device the case says so and checks nothing.
#include <cuda_runtime.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cachemgr/client/client.h"
#include "cachemgr/kernels/elem_convert.h"
#include "cachemgr/peers/nccl_comm.h"
#include "kernels/cuda/write_kv.h"
#include "tests/support/daemon_process.h"
#include "tests/support/temp_dir.h"

namespace cachemgr {
namespace {

using client::Session;

constexpr uint32_t kLayers = 8, kKvHeads = 8, kDim = 128, kBlock = 16, kTokens = 4096;

int DeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

client::AttachOptions Options(const std::string& name) {
  client::AttachOptions options;
  options.client_name = name;
  options.model.name = "nccl-model";
  options.model.num_layers = kLayers;
  options.model.num_q_heads = kKvHeads * 4;
  options.model.num_kv_heads = kKvHeads;
  options.model.head_dim = kDim;
  options.model.dtype = client::DType::kFp16;
  options.model.block_size = kBlock;
  options.model.rope.style = client::RopeStyle::kNone;
  options.num_blocks = kTokens / kBlock + 8;
  return options;
}

// Layer l's K (plane 0) or V (plane 1) rows, fp16, on the device.
std::byte* Rows(uint32_t plane, uint32_t layer) {
  std::vector<uint16_t> host(size_t{kTokens} * kKvHeads * kDim);
  for (size_t i = 0; i < host.size(); ++i) {
    host[i] = kernels::F32ToF16(std::sin(0.001f * static_cast<float>(i) + plane + 0.5f * layer));
  }
  void* dev = nullptr;
  REQUIRE(cudaMalloc(&dev, host.size() * 2) == cudaSuccess);
  REQUIRE(cudaMemcpy(dev, host.data(), host.size() * 2, cudaMemcpyHostToDevice) == cudaSuccess);
  return static_cast<std::byte*>(dev);
}

std::vector<uint64_t> Digests(Session& s, const std::string& id) {
  auto info = s.GetSequence(id, /*include_kv_digest=*/true);
  REQUIRE(info.ok());
  std::vector<uint64_t> out;
  for (const auto& l : info->layers) out.push_back(l.kv_digest);
  return out;
}

// Transfers, retrying while B is not yet known to A as up.
client::TransferResult Transfer(Session& a, const client::TransferOptions& options) {
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  for (;;) {
    absl::StatusOr<client::TransferResult> r = a.TransferSequence(options);
    if (r.ok()) return *r;
    INFO(r.status().ToString());
    REQUIRE((r.status().code() == absl::StatusCode::kUnavailable ||
             r.status().code() == absl::StatusCode::kNotFound));
    REQUIRE(absl::Now() < deadline);
    absl::SleepFor(absl::Milliseconds(200));
  }
}

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

TEST_CASE("a sequence crosses between two daemons' GPU pools over an NCCL row link", "[gpu]") {
  const int devices = DeviceCount();
  if (devices < 1) {
    std::printf("no CUDA device: the NCCL row link was not run\n");
    SUCCEED();
    return;
  }
  const int device_b = devices >= 2 ? 1 : 0;
  testing::TempDir dir;
  const std::string token = dir.file("token");
  { std::ofstream(token) << "cluster-token-0123456789\n"; }
  REQUIRE(::chmod(token.c_str(), 0600) == 0);
  const int port_a = FreePort(), port_b = FreePort();
  const auto args = [&](int device, int port, int peer_port) {
    return std::vector<std::string>{"--backend=cuda",
                                    absl::StrCat("--cuda_device=", device),
                                    absl::StrCat("--tcp_address=127.0.0.1:", port),
                                    "--tcp_plaintext_loopback",
                                    "--tcp_token_file=" + token,
                                    absl::StrCat("--peers=127.0.0.1:", peer_port),
                                    "--peer_probe_interval_ms=200",
                                    "--row_links=nccl",
                                    "--memory_budget=4G"};
  };
  auto b = testing::DaemonProcess::Start(args(device_b, port_b, port_a));
  REQUIRE(b.ok());
  auto a = testing::DaemonProcess::Start(args(0, port_a, port_b));
  REQUIRE(a.ok());
  auto sa = Session::Attach((*a)->socket_path(), Options("prefill"));
  REQUIRE(sa.ok());
  auto sb = Session::Attach((*b)->socket_path(), Options("decode"));
  REQUIRE(sb.ok());

  auto alloc = (*sa)->Allocate("req", kTokens);
  REQUIRE(alloc.ok());
  const client::KvPoolView& pool = (*sa)->pool();
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  for (uint32_t l = 0; l < kLayers; ++l) {
    std::byte* k = Rows(0, l);
    std::byte* v = Rows(1, l);
    int64_t* slots = nullptr;
    const auto& mapping = alloc->layers[l].slot_mapping;
    REQUIRE(cudaMalloc(&slots, mapping.size() * 8) == cudaSuccess);
    REQUIRE(cudaMemcpy(slots, mapping.data(), mapping.size() * 8, cudaMemcpyHostToDevice) ==
            cudaSuccess);
    REQUIRE(
        kernels::WriteKvBySlotCuda(pool.layout(), pool.layer_base(l), k, v, slots, kTokens, nullptr)
            .ok());
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    cudaFree(k);
    cudaFree(v);
    cudaFree(slots);
  }
  const std::vector<uint64_t> before = Digests(**sa, "req");
  const uint64_t bytes = uint64_t{2} * kLayers * kTokens * kKvHeads * kDim * 2;

  client::TransferOptions first;
  first.sequence_id = "req";
  first.peer = absl::StrCat("127.0.0.1:", port_b);
  first.destination_session_token = (*sb)->session_token();
  first.destination_sequence_id = "copy-1";
  first.transfer_id = "nccl-1";
  const client::TransferResult r1 = Transfer(**sa, first);
  CHECK(r1.payload_bytes == bytes);
  CHECK(Digests(**sb, "copy-1") == before);
  client::TransferOptions second = first;
  second.destination_sequence_id = "copy-2";
  second.transfer_id = "nccl-2";
  const auto start = std::chrono::steady_clock::now();
  const client::TransferResult r2 = Transfer(**sa, second);
  const double took = Seconds(start);
  CHECK(Digests(**sb, "copy-2") == before);

  if (devices < 2) {
    // One GPU: B refused the offer (NCCL links two GPUs), the stream carried the rows.
    CHECK(r1.row_link.empty());
    CHECK(r2.row_link.empty());
    CHECK(r1.wire_bytes > bytes);
    std::printf(
        "one GPU: the rows took the stream (B refused the NCCL offer); %.1f MiB in %.3f s\n",
        bytes / 1048576.0, took);
    return;
  }
  CHECK(r1.row_link == "nccl");
  CHECK_FALSE(r1.row_link_reused);
  CHECK(r2.row_link == "nccl");
  CHECK(r2.row_link_reused);
  CHECK(r1.wire_bytes < (1u << 20));  // the stream held the header and the end

  // The same bytes device to device, in this run: cudaMemcpyPeer, and raw NCCL send/recv
  // between the two GPUs (one thread per rank, a communicator of this process).
  void* src = nullptr;
  void* dst = nullptr;
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  REQUIRE(cudaMalloc(&src, bytes) == cudaSuccess);
  REQUIRE(cudaSetDevice(1) == cudaSuccess);
  REQUIRE(cudaMalloc(&dst, bytes) == cudaSuccess);
  REQUIRE(cudaMemcpyPeer(dst, 1, src, 0, bytes) == cudaSuccess);  // warm
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const auto peer_start = std::chrono::steady_clock::now();
  REQUIRE(cudaMemcpyPeer(dst, 1, src, 0, bytes) == cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const double peer = Seconds(peer_start);

  auto id = NcclComm::NewUniqueId();
  REQUIRE(id.ok());
  double nccl = 0;
  absl::Status rank_status[2];
  const auto rank = [&](int r) {
    absl::StatusOr<NcclComm> comm = NcclComm::Init(r, 2, r, *id);
    if (!comm.ok()) {
      rank_status[r] = comm.status();
      return;
    }
    cudaStream_t stream = nullptr;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    const NcclComm::Op op{r == 0 ? NcclComm::Op::Kind::kSend : NcclComm::Op::Kind::kRecv,
                          r == 0 ? src : dst, bytes, 1 - r};
    for (int i = 0; i < 2; ++i) {  // a warm-up, then the timed one
      const auto t0 = std::chrono::steady_clock::now();
      rank_status[r] = comm->Group({&op, 1}, stream);
      if (!rank_status[r].ok()) break;
      cudaStreamSynchronize(stream);
      if (r == 1 && i == 1) nccl = Seconds(t0);
    }
    cudaStreamDestroy(stream);
  };
  std::thread rank0(rank, 0), rank1(rank, 1);
  rank0.join();
  rank1.join();
  REQUIRE(rank_status[0].ok());
  REQUIRE(rank_status[1].ok());
  std::printf(
      "NCCL row link: %.1f MiB in %.3f s (%.2f GB/s, the whole TransferSequence with digests) vs "
      "cudaMemcpyPeer %.3f s (%.2f GB/s) and raw NCCL send/recv %.3f s (%.2f GB/s): "
      "link / cudaMemcpyPeer %.3f, link / raw NCCL %.3f\n",
      bytes / 1048576.0, took, bytes / took / 1e9, peer, bytes / peer / 1e9, nccl,
      bytes / nccl / 1e9, peer / took, nccl / took);
  cudaFree(dst);
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  cudaFree(src);
}

}  // namespace
}  // namespace cachemgr
