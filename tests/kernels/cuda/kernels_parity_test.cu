// CUDA kernels vs their CPU twins: byte-exact parity on seeded random inputs. Without a CUDA
// device the parity cases say so and check nothing; the host-side argument checks of the
// launchers run everywhere (they fail before touching the device).
#include <cuda_runtime.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "cachemgr/kernels/block_copy_types.h"
#include "cachemgr/kernels/kv_layout.h"
#include "kernels/cpu/block_copy.h"
#include "kernels/cpu/write_kv.h"
#include "kernels/cuda/block_copy.h"
#include "kernels/cuda/write_kv.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace cachemgr::kernels {
namespace {

constexpr std::byte kPoison{0xAB};

using testing::DeviceBuffer;
using testing::FillRandom;
using testing::FromDevice;
using testing::HaveCudaDevice;
using testing::ToDevice;

struct Case {
  KvOrder order;
  uint32_t head_dim;
  uint32_t num_kv_heads;
  uint32_t elem_bytes;
  size_t base_offset;  // Bytes past a cudaMalloc'ed (256-aligned) pointer; non-zero -> byte path.
};

std::vector<Case> Cases() {
  std::vector<Case> cases;
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    for (uint32_t dim : {8u, 64u, 128u}) {
      for (uint32_t elem : {2u, 4u}) {
        cases.push_back({order, dim, 2, elem, 0});
        cases.push_back({order, dim, 2, elem, 2});  // Misaligned tensor and rows.
      }
    }
    cases.push_back({order, 5, 3, 2, 0});  // 30-byte rows: not a multiple of 16.
  }
  return cases;
}

KvLayerLayout LayoutFor(const Case& c) {
  KvLayerLayout l;
  l.order = c.order;
  l.num_blocks = 24;
  l.block_size = 16;
  l.num_kv_heads = c.num_kv_heads;
  l.head_dim = c.head_dim;
  l.elem_bytes = c.elem_bytes;
  return l;
}

TEST_CASE("CopyBlocksCuda matches CopyBlocksCpu byte for byte", "[gpu]") {
  if (!HaveCudaDevice()) {
    SUCCEED();
    return;
  }
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  std::mt19937 rng(0xC0FFEE);
  for (const Case& c : Cases()) {
    CAPTURE(static_cast<int>(c.order), c.head_dim, c.num_kv_heads, c.elem_bytes, c.base_offset);
    const KvLayerLayout l = LayoutFor(c);
    const size_t bytes = l.layer_bytes();

    // Fresh random pairs: 8 distinct dsts, srcs drawn from the other blocks.
    std::vector<uint32_t> ids(l.num_blocks);
    std::iota(ids.begin(), ids.end(), 0u);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<BlockCopyPair> pairs;
    for (uint32_t i = 0; i < 8; ++i) pairs.push_back({ids[8 + rng() % 16], ids[i]});
    REQUIRE(ValidateBlockCopyPairs(l, pairs).ok());

    // Random tensor with the dst blocks poisoned, identical on host and device.
    std::vector<std::byte> host(bytes);
    FillRandom(host, rng);
    for (const BlockCopyPair& p : pairs) {
      for (KvPlane plane : {KvPlane::kKey, KvPlane::kValue}) {
        std::fill_n(host.begin() + l.block_offset(plane, p.dst), l.plane_block_bytes(), kPoison);
      }
    }
    DeviceBuffer layer(bytes + c.base_offset);
    std::byte* dev_base = layer.get() + c.base_offset;
    ToDevice(dev_base, host.data(), bytes);
    DeviceBuffer dev_pairs(pairs.size() * sizeof(BlockCopyPair));
    ToDevice(dev_pairs.get(), pairs.data(), pairs.size() * sizeof(BlockCopyPair));

    REQUIRE(CopyBlocksCpu(l, host.data(), pairs).ok());
    REQUIRE(CopyBlocksCuda(l, dev_base, reinterpret_cast<const BlockCopyPair*>(dev_pairs.get()),
                           static_cast<uint32_t>(pairs.size()), stream)
                .ok());
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
    REQUIRE(FromDevice(dev_base, bytes) == host);
  }
  REQUIRE(cudaStreamDestroy(stream) == cudaSuccess);
}

TEST_CASE("WriteKvBySlotCuda matches WriteKvBySlotCpu byte for byte", "[gpu]") {
  if (!HaveCudaDevice()) {
    SUCCEED();
    return;
  }
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  std::mt19937 rng(0xBEEF);
  for (const Case& c : Cases()) {
    CAPTURE(static_cast<int>(c.order), c.head_dim, c.num_kv_heads, c.elem_bytes, c.base_offset);
    const KvLayerLayout l = LayoutFor(c);
    const size_t bytes = l.layer_bytes();
    const size_t row = l.token_bytes();
    const int64_t num_slots = int64_t{l.num_blocks} * l.block_size;

    // Fresh random distinct slots for 150 tokens, a few of them padding.
    std::vector<int64_t> perm(num_slots);
    std::iota(perm.begin(), perm.end(), int64_t{0});
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int64_t> slots(perm.begin(), perm.begin() + 150);
    for (int i = 0; i < 10; ++i) slots[rng() % slots.size()] = -1;
    const size_t num_tokens = slots.size();
    std::vector<std::byte> key(num_tokens * row), value(num_tokens * row);
    FillRandom(key, rng);
    FillRandom(value, rng);

    // Poisoned output on both sides.
    std::vector<std::byte> host(bytes, kPoison);
    DeviceBuffer layer(bytes + c.base_offset);
    std::byte* dev_base = layer.get() + c.base_offset;
    REQUIRE(cudaMemset(dev_base, 0xAB, bytes) == cudaSuccess);
    DeviceBuffer dev_key(key.size() + c.base_offset), dev_value(value.size() + c.base_offset);
    ToDevice(dev_key.get() + c.base_offset, key.data(), key.size());
    ToDevice(dev_value.get() + c.base_offset, value.data(), value.size());
    DeviceBuffer dev_slots(num_tokens * sizeof(int64_t));
    ToDevice(dev_slots.get(), slots.data(), num_tokens * sizeof(int64_t));

    REQUIRE(WriteKvBySlotCpu(l, host.data(), key.data(), value.data(), slots).ok());
    REQUIRE(WriteKvBySlotCuda(l, dev_base, dev_key.get() + c.base_offset,
                              dev_value.get() + c.base_offset,
                              reinterpret_cast<const int64_t*>(dev_slots.get()),
                              static_cast<uint32_t>(num_tokens), stream)
                .ok());
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
    REQUIRE(FromDevice(dev_base, bytes) == host);
  }
  REQUIRE(cudaStreamDestroy(stream) == cudaSuccess);
}

TEST_CASE("ReadKvBySlotCuda matches ReadKvBySlotCpu byte for byte", "[gpu]") {
  if (!HaveCudaDevice()) {
    SUCCEED();
    return;
  }
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  std::mt19937 rng(0xFEED);
  for (const Case& c : Cases()) {
    CAPTURE(static_cast<int>(c.order), c.head_dim, c.num_kv_heads, c.elem_bytes, c.base_offset);
    const KvLayerLayout l = LayoutFor(c);
    const size_t bytes = l.layer_bytes();
    const int64_t num_slots = int64_t{l.num_blocks} * l.block_size;
    std::vector<int64_t> perm(num_slots);
    std::iota(perm.begin(), perm.end(), int64_t{0});
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int64_t> slots(perm.begin(), perm.begin() + 150);
    for (int i = 0; i < 10; ++i) slots[rng() % slots.size()] = -1;
    const size_t num_tokens = slots.size();
    const size_t rows = num_tokens * l.token_bytes();

    std::vector<std::byte> host(bytes);
    FillRandom(host, rng);
    DeviceBuffer layer(bytes + c.base_offset);
    std::byte* dev_base = layer.get() + c.base_offset;
    ToDevice(dev_base, host.data(), bytes);
    DeviceBuffer dev_slots(num_tokens * sizeof(int64_t));
    ToDevice(dev_slots.get(), slots.data(), num_tokens * sizeof(int64_t));
    // Poisoned rows on both sides: padding tokens' rows stay poisoned.
    std::vector<std::byte> key(rows, kPoison), value(rows, kPoison);
    DeviceBuffer dev_key(rows + c.base_offset), dev_value(rows + c.base_offset);
    REQUIRE(cudaMemset(dev_key.get() + c.base_offset, 0xAB, rows) == cudaSuccess);
    REQUIRE(cudaMemset(dev_value.get() + c.base_offset, 0xAB, rows) == cudaSuccess);

    REQUIRE(ReadKvBySlotCpu(l, host.data(), key.data(), value.data(), slots).ok());
    REQUIRE(ReadKvBySlotCuda(l, dev_base, dev_key.get() + c.base_offset,
                             dev_value.get() + c.base_offset,
                             reinterpret_cast<const int64_t*>(dev_slots.get()),
                             static_cast<uint32_t>(num_tokens), stream)
                .ok());
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
    REQUIRE(FromDevice(dev_key.get() + c.base_offset, rows) == key);
    REQUIRE(FromDevice(dev_value.get() + c.base_offset, rows) == value);
  }
  REQUIRE(cudaStreamDestroy(stream) == cudaSuccess);
}

TEST_CASE("CUDA kernels skip ids they cannot report", "[gpu]") {
  if (!HaveCudaDevice()) {
    SUCCEED();
    return;
  }
  KvLayerLayout l = LayoutFor({KvOrder::kFlashInfer, 64, 2, 2, 0});
  const size_t bytes = l.layer_bytes();
  std::mt19937 rng(42);
  std::vector<std::byte> host(bytes);
  FillRandom(host, rng);
  DeviceBuffer layer(bytes);
  ToDevice(layer.get(), host.data(), bytes);

  // Out-of-range and src == dst pairs are no-ops on the device.
  const std::vector<BlockCopyPair> bad_pairs = {{0, l.num_blocks}, {l.num_blocks + 5, 1}, {3, 3}};
  DeviceBuffer dev_pairs(bad_pairs.size() * sizeof(BlockCopyPair));
  ToDevice(dev_pairs.get(), bad_pairs.data(), bad_pairs.size() * sizeof(BlockCopyPair));
  REQUIRE(CopyBlocksCuda(l, layer.get(), reinterpret_cast<const BlockCopyPair*>(dev_pairs.get()),
                         static_cast<uint32_t>(bad_pairs.size()), nullptr)
              .ok());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  REQUIRE(FromDevice(layer.get(), bytes) == host);

  // Slots outside [-1, num_slots) are skipped like padding.
  const std::vector<int64_t> bad_slots = {int64_t{l.num_blocks} * l.block_size, -2, -1};
  std::vector<std::byte> rows(bad_slots.size() * l.token_bytes());
  FillRandom(rows, rng);
  DeviceBuffer dev_rows(rows.size());
  ToDevice(dev_rows.get(), rows.data(), rows.size());
  DeviceBuffer dev_slots(bad_slots.size() * sizeof(int64_t));
  ToDevice(dev_slots.get(), bad_slots.data(), bad_slots.size() * sizeof(int64_t));
  REQUIRE(WriteKvBySlotCuda(l, layer.get(), dev_rows.get(), dev_rows.get(),
                            reinterpret_cast<const int64_t*>(dev_slots.get()),
                            static_cast<uint32_t>(bad_slots.size()), nullptr)
              .ok());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  REQUIRE(FromDevice(layer.get(), bytes) == host);
}

// These fail before any CUDA call, so they hold with or without a device.
TEST_CASE("CUDA launchers reject bad host-side arguments", "[gpu]") {
  KvLayerLayout l = LayoutFor({KvOrder::kFlashAttn, 8, 2, 2, 0});
  auto* fake = reinterpret_cast<std::byte*>(uintptr_t{0x1000});  // Never dereferenced.
  const auto* fake_pairs = reinterpret_cast<const BlockCopyPair*>(fake);
  const auto* fake_slots = reinterpret_cast<const int64_t*>(fake);
  const auto invalid = absl::StatusCode::kInvalidArgument;

  CHECK(CopyBlocksCuda(l, nullptr, fake_pairs, 1, nullptr).code() == invalid);
  CHECK(CopyBlocksCuda(l, fake, nullptr, 1, nullptr).code() == invalid);
  CHECK(CopyBlocksCuda(l, fake, fake_pairs, 0x80000000u, nullptr).code() == invalid);
  CHECK(CopyBlocksCuda(l, nullptr, nullptr, 0, nullptr).ok());  // Nothing to launch.

  CHECK(WriteKvBySlotCuda(l, nullptr, fake, fake, fake_slots, 1, nullptr).code() == invalid);
  CHECK(WriteKvBySlotCuda(l, fake, nullptr, fake, fake_slots, 1, nullptr).code() == invalid);
  CHECK(WriteKvBySlotCuda(l, fake, fake, nullptr, fake_slots, 1, nullptr).code() == invalid);
  CHECK(WriteKvBySlotCuda(l, fake, fake, fake, nullptr, 1, nullptr).code() == invalid);
  CHECK(WriteKvBySlotCuda(l, fake, fake, fake, fake_slots, 0x80000000u, nullptr).code() == invalid);
  CHECK(WriteKvBySlotCuda(l, nullptr, nullptr, nullptr, nullptr, 0, nullptr).ok());

  CHECK(ReadKvBySlotCuda(l, nullptr, fake, fake, fake_slots, 1, nullptr).code() == invalid);
  CHECK(ReadKvBySlotCuda(l, fake, nullptr, fake, fake_slots, 1, nullptr).code() == invalid);
  CHECK(ReadKvBySlotCuda(l, fake, fake, nullptr, fake_slots, 1, nullptr).code() == invalid);
  CHECK(ReadKvBySlotCuda(l, fake, fake, fake, nullptr, 1, nullptr).code() == invalid);
  CHECK(ReadKvBySlotCuda(l, fake, fake, fake, fake_slots, 0x80000000u, nullptr).code() == invalid);
  CHECK(ReadKvBySlotCuda(l, nullptr, nullptr, nullptr, nullptr, 0, nullptr).ok());

  l.elem_bytes = 0;
  CHECK(CopyBlocksCuda(l, fake, fake_pairs, 1, nullptr).code() == invalid);
  CHECK(WriteKvBySlotCuda(l, fake, fake, fake, fake_slots, 1, nullptr).code() == invalid);
  CHECK(ReadKvBySlotCuda(l, fake, fake, fake, fake_slots, 1, nullptr).code() == invalid);
}

}  // namespace
}  // namespace cachemgr::kernels
