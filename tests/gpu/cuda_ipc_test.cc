// The CUDA backend end to end, on a GPU: the real cachemgrd (--backend=cuda) owns the pool, this
// process attaches as an engine would, maps the pool through each IPC path (VMM fd, legacy
// handle), writes K/V with the slot-mapping kernel, and checks that the daemon reads exactly
// those bytes (digest), compacts them in place on Compress (the rows this process reads back are
// the kept tokens'), scores tokens on the device from window queries written on an
// unsynchronised stream and ordered by the session's CUDA write event (SnapKV keeps what the CPU
// twin keeps), and builds a codebook layer (similarity graph on the device) that Fetch rebuilds
// into fresh blocks. Without a CUDA
// device the daemon refuses --backend=cuda and the case says so and checks nothing.
#include <cuda_runtime.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "cachemgr/client/client.h"
#include "cachemgr/compress/compress.h"
#include "cachemgr/kernels/elem_convert.h"
#include "cachemgr/kernels/kv_digest.h"
#include "kernels/cuda/write_kv.h"
#include "tests/support/daemon_process.h"

namespace cachemgr {
namespace {

using client::CacheLayout;
using client::Session;

constexpr uint32_t kLayers = 2, kQHeads = 8, kKvHeads = 2, kDim = 64, kBlock = 16, kTokens = 100;

// Deterministic fp16 value of element (layer, token, head, d) of K (plane 0) or V (plane 1).
uint16_t Element(uint32_t plane, uint32_t layer, uint32_t token, uint32_t head, uint32_t d) {
  const float x = std::sin(0.37f * (token + 1) + 0.11f * d + 1.3f * head + 2.1f * layer + plane);
  return kernels::F32ToF16(x * (1.0f + 0.01f * token));
}

std::vector<uint16_t> Rows(uint32_t plane, uint32_t layer) {
  std::vector<uint16_t> rows(size_t{kTokens} * kKvHeads * kDim);
  for (uint32_t t = 0; t < kTokens; ++t)
    for (uint32_t h = 0; h < kKvHeads; ++h)
      for (uint32_t d = 0; d < kDim; ++d)
        rows[(size_t{t} * kKvHeads + h) * kDim + d] = Element(plane, layer, t, h, d);
  return rows;
}

template <typename T>
T* ToDevice(const std::vector<T>& host) {
  void* p = nullptr;
  REQUIRE(cudaMalloc(&p, host.size() * sizeof(T)) == cudaSuccess);
  REQUIRE(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) ==
          cudaSuccess);
  return static_cast<T*>(p);
}

// One head vector of the mapped pool, copied to the host.
std::vector<uint16_t> ReadHead(const client::KvPoolView& pool, uint32_t layer,
                               kernels::KvPlane plane, uint32_t block, uint32_t slot,
                               uint32_t head) {
  std::vector<uint16_t> out(kDim);
  const std::byte* src =
      pool.layer_base(layer) + pool.layout().head_offset(plane, block, slot, head);
  REQUIRE(cudaMemcpy(out.data(), src, kDim * 2, cudaMemcpyDeviceToHost) == cudaSuccess);
  return out;
}

std::vector<uint16_t> Expected(uint32_t plane, uint32_t layer, uint32_t token, uint32_t head) {
  std::vector<uint16_t> out(kDim);
  for (uint32_t d = 0; d < kDim; ++d) out[d] = Element(plane, layer, token, head, d);
  return out;
}

TEST_CASE("an engine process maps the daemon's GPU pool and sees it compacted in place", "[gpu]") {
  for (const std::string share : {"vmm_fd", "ipc_handle"}) {
    for (CacheLayout layout : {CacheLayout::kFlashAttn, CacheLayout::kFlashInfer}) {
      CAPTURE(share, static_cast<int>(layout));
      absl::StatusOr<std::unique_ptr<testing::DaemonProcess>> daemon =
          testing::DaemonProcess::Start({"--backend=cuda", "--cuda_share=" + share});
      if (!daemon.ok() && absl::StrContains(daemon.status().message(), "no CUDA device")) {
        std::printf("no CUDA device: cachemgrd refused --backend=cuda; GPU IPC not checked\n");
        SUCCEED();
        return;
      }
      REQUIRE(daemon.ok());

      client::AttachOptions options;
      options.client_name = "gpu-engine";
      options.model.name = "gpu-model";
      options.model.num_layers = kLayers;
      options.model.num_q_heads = kQHeads;
      options.model.num_kv_heads = kKvHeads;
      options.model.head_dim = kDim;
      options.model.dtype = client::DType::kFp16;
      options.model.block_size = kBlock;
      options.model.layout = layout;
      options.model.rope.style = client::RopeStyle::kNone;
      options.num_blocks = 64;
      absl::StatusOr<std::unique_ptr<Session>> session =
          Session::Attach((*daemon)->socket_path(), options);
      REQUIRE(session.ok());
      const client::KvPoolView& pool = (*session)->pool();
      CHECK(pool.on_device());
      CHECK(pool.device().rfind("GPU-", 0) == 0);

      // Write every layer's K/V with the slot-mapping kernel, as vLLM's reshape_and_cache.
      std::vector<std::vector<uint16_t>> keys, values;
      for (uint32_t l = 0; l < kLayers; ++l) {
        keys.push_back(Rows(0, l));
        values.push_back(Rows(1, l));
      }
      auto write_all = [&](const client::Allocation& alloc) {
        for (uint32_t l = 0; l < kLayers; ++l) {
          uint16_t* k = ToDevice(keys[l]);
          uint16_t* v = ToDevice(values[l]);
          int64_t* slots = ToDevice(alloc.layers[l].slot_mapping);
          REQUIRE(kernels::WriteKvBySlotCuda(
                      pool.layout(), pool.layer_base(l), reinterpret_cast<std::byte*>(k),
                      reinterpret_cast<std::byte*>(v), slots, kTokens, nullptr)
                      .ok());
          REQUIRE(cudaDeviceSynchronize() == cudaSuccess);  // the client's side of the ordering
          cudaFree(k);
          cudaFree(v);
          cudaFree(slots);
        }
      };
      absl::StatusOr<client::Allocation> alloc = (*session)->Allocate("seq", kTokens);
      REQUIRE(alloc.ok());
      write_all(*alloc);

      // The daemon reads exactly what was written.
      absl::StatusOr<client::SequenceInfo> info =
          (*session)->GetSequence("seq", /*include_kv_digest=*/true);
      REQUIRE(info.ok());
      for (uint32_t l = 0; l < kLayers; ++l) {
        uint64_t h = kernels::kFnv1a64Offset;
        for (uint32_t t = 0; t < kTokens; ++t) {
          h = kernels::Fnv1a64(reinterpret_cast<const std::byte*>(&keys[l][t * kKvHeads * kDim]),
                               kKvHeads * kDim * 2, h);
          h = kernels::Fnv1a64(reinterpret_cast<const std::byte*>(&values[l][t * kKvHeads * kDim]),
                               kKvHeads * kDim * 2, h);
        }
        CHECK(info->layers[l].kv_digest == h);
      }

      // Compress in place; the rows this process reads are the kept tokens'.
      client::CompressOptions compress;
      compress.policy.preset = "streamingllm";
      compress.policy.sinks = 4;
      compress.target = 0.5;
      absl::StatusOr<client::CompressResult> result = (*session)->Compress("seq", compress);
      REQUIRE(result.ok());
      CHECK(result->blocks_released > 0);
      for (const client::CompressedLayer& l : result->layers) {
        const uint32_t rows = l.num_tokens;
        REQUIRE(l.kept_positions.size() == size_t{kKvHeads} * rows);
        for (uint32_t h = 0; h < kKvHeads; ++h) {
          for (uint32_t r = 0; r < rows; ++r) {
            const uint32_t token = l.kept_positions[h * rows + r];
            const uint32_t block = l.block_ids[r / kBlock];
            CHECK(ReadHead(pool, l.layer, kernels::KvPlane::kKey, block, r % kBlock, h) ==
                  Expected(0, l.layer, token, h));
            CHECK(ReadHead(pool, l.layer, kernels::KvPlane::kValue, block, r % kBlock, h) ==
                  Expected(1, l.layer, token, h));
          }
        }
      }

      // Window scores on the device: SnapKV from window queries keeps what the CPU twin keeps
      // on the same rows. The device softmax agrees to ~1e-5 relative, so at most a near-tie at
      // the budget's edge may swap a token or two per head.
      // This sequence is written on a stream the test never synchronises before Compress: the
      // session's CUDA write event, recorded after the writes, orders them before the daemon's
      // reads.
      absl::StatusOr<client::Allocation> snap_alloc = (*session)->Allocate("snap", kTokens);
      REQUIRE(snap_alloc.ok());
      cudaStream_t stream = nullptr;
      REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
      std::vector<void*> staged;
      for (uint32_t l = 0; l < kLayers; ++l) {
        uint16_t* k = ToDevice(keys[l]);
        uint16_t* v = ToDevice(values[l]);
        int64_t* slots = ToDevice(snap_alloc->layers[l].slot_mapping);
        REQUIRE(kernels::WriteKvBySlotCuda(pool.layout(), pool.layer_base(l),
                                           reinterpret_cast<std::byte*>(k),
                                           reinterpret_cast<std::byte*>(v), slots, kTokens, stream)
                    .ok());
        staged.insert(staged.end(), {k, v, slots});
      }
      REQUIRE((*session)->RecordKvWrites(stream).ok());
      constexpr uint32_t kQueries = 8;
      const size_t per_layer = size_t{kQueries} * kQHeads * kDim;
      std::vector<float> queries(kLayers * per_layer);
      for (size_t i = 0; i < queries.size(); ++i) {
        queries[i] = std::sin(0.7f * i) + 0.3f * std::cos(1.9f * i + 0.2f);
      }
      std::span<float> buffer = (*session)->input_buffer();
      REQUIRE(buffer.size() >= queries.size());
      std::copy(queries.begin(), queries.end(), buffer.begin());
      client::CompressOptions snap;
      snap.policy.preset = "snapkv";
      snap.policy.window = kQueries;
      snap.target = 0.4;
      snap.input = client::CompressInputSource::kWindowQueries;
      snap.num_queries = kQueries;
      absl::StatusOr<client::CompressResult> snapped = (*session)->Compress("snap", snap);
      REQUIRE(snapped.ok());
      REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
      for (void* p : staged) cudaFree(p);
      cudaStreamDestroy(stream);
      compress::ModelShape shape;
      shape.num_layers = kLayers;
      shape.num_q_heads = kQHeads;
      shape.num_kv_heads = kKvHeads;
      shape.head_dim = kDim;
      shape.rope_style = compress::RopeStyle::kNone;
      std::vector<std::vector<float>> keys_f32(kLayers), values_f32(kLayers);
      compress::SequenceInput input;
      input.num_tokens = kTokens;
      input.layers.resize(kLayers);
      for (uint32_t l = 0; l < kLayers; ++l) {
        for (uint16_t x : keys[l]) keys_f32[l].push_back(kernels::F16ToF32(x));
        for (uint16_t x : values[l]) values_f32[l].push_back(kernels::F16ToF32(x));
        input.layers[l].keys = keys_f32[l].data();
        input.layers[l].values = values_f32[l].data();
        input.layers[l].queries = queries.data() + l * per_layer;
        input.layers[l].num_queries = kQueries;
      }
      absl::StatusOr<compress::PolicyConfig> policy = compress::PresetPolicy("snapkv");
      REQUIRE(policy.ok());
      policy->window = kQueries;
      absl::StatusOr<compress::SequenceResult> want = compress::CompressSequence(
          shape, *policy, input, {compress::TargetKind::kReserveRatio, 0.4});
      REQUIRE(want.ok());
      for (const client::CompressedLayer& l : snapped->layers) {
        const compress::LayerResult& w = want->layers[l.layer];
        REQUIRE(l.kept_per_head == w.kept_per_head);
        for (uint32_t h = 0; h < kKvHeads; ++h) {
          const auto got = l.kept_positions.begin() + size_t{h} * l.kept_per_head;
          const auto ref = w.kept.begin() + size_t{h} * w.kept_per_head;
          std::vector<uint32_t> common;
          std::set_intersection(got, got + l.kept_per_head, ref, ref + w.kept_per_head,
                                std::back_inserter(common));
          CAPTURE(l.layer, h);
          CHECK(common.size() + 2 >= l.kept_per_head);
        }
      }

      // A codebook layer parks in the daemon's arena (every block released) and comes back
      // through Fetch: rebuilt from the codebook on the device into fresh blocks.
      absl::StatusOr<client::Allocation> cb_alloc = (*session)->Allocate("cb", kTokens);
      REQUIRE(cb_alloc.ok());
      write_all(*cb_alloc);
      client::CompressOptions cb;
      cb.policy.preset = "codebook";
      cb.policy.codebook_only_if_smaller = false;
      cb.policy.theta_k = 1.0f;  // merges exact duplicates only: lossless up to fp16 rounding
      cb.policy.theta_v = 1.0f;
      cb.target = 1.0;
      REQUIRE((*session)->Compress("cb", cb).ok());
      absl::StatusOr<std::vector<client::FetchedLayer>> fetched = (*session)->Fetch("cb");
      REQUIRE(fetched.ok());
      REQUIRE(fetched->size() == kLayers);
      for (const client::FetchedLayer& l : *fetched) {
        REQUIRE(l.num_tokens == kTokens);
        for (uint32_t t = 0; t < kTokens; t += 7) {
          for (uint32_t h = 0; h < kKvHeads; ++h) {
            const uint32_t block = l.block_ids[t / kBlock];
            for (uint32_t plane = 0; plane < 2; ++plane) {
              const std::vector<uint16_t> got = ReadHead(
                  pool, l.layer, static_cast<kernels::KvPlane>(plane), block, t % kBlock, h);
              const std::vector<uint16_t> want = Expected(plane, l.layer, t, h);
              for (uint32_t d = 0; d < kDim; ++d) {
                CHECK(std::abs(kernels::F16ToF32(got[d]) - kernels::F16ToF32(want[d])) <=
                      2e-3f * (1.0f + std::abs(kernels::F16ToF32(want[d]))));
              }
            }
          }
        }
      }

      REQUIRE((*session)->Free("seq").ok());
      REQUIRE((*session)->Free("snap").ok());
      REQUIRE((*session)->Free("cb").ok());
      REQUIRE((*session)->Detach().ok());
      absl::StatusOr<int> code = (*daemon)->Terminate();
      REQUIRE(code.ok());
      CHECK(*code == 0);
    }
  }
}

}  // namespace
}  // namespace cachemgr
