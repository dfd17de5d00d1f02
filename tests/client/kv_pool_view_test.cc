// KvPoolView over a local buffer: typed accessors land on hand-computed offsets in both orders.
#include "cachemgr/client/kv_pool_view.h"

#include <catch2/catch.hpp>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace cachemgr::client {
namespace {

using kernels::KvLayerLayout;
using kernels::KvOrder;

constexpr uint32_t kLayers = 3;
constexpr uint32_t kBlocks = 5;
constexpr uint32_t kBlockSize = 4;
constexpr uint32_t kHeads = 2;
constexpr uint32_t kHeadDim = 8;

KvLayerLayout MakeLayout(KvOrder order, uint32_t elem_bytes) {
  KvLayerLayout layout;
  layout.order = order;
  layout.num_blocks = kBlocks;
  layout.block_size = kBlockSize;
  layout.num_kv_heads = kHeads;
  layout.head_dim = kHeadDim;
  layout.elem_bytes = elem_bytes;
  return layout;
}

// Element index (not bytes) of K/V[layer-local] per the shapes in kv_layout.h.
size_t FlashAttnIndex(uint32_t plane, uint32_t block, uint32_t slot, uint32_t head) {
  return ((((size_t{plane} * kBlocks + block) * kBlockSize + slot) * kHeads + head) * kHeadDim);
}
size_t FlashInferIndex(uint32_t plane, uint32_t block, uint32_t slot, uint32_t head) {
  return ((((size_t{block} * 2 + plane) * kBlockSize + slot) * kHeads + head) * kHeadDim);
}

struct Fixture {
  explicit Fixture(KvOrder order) : layout(MakeLayout(order, sizeof(float))) {
    buffer.resize(kLayers * layout.layer_bytes() / sizeof(float) + 16);
    std::vector<std::byte*> bases;
    // Layers deliberately not back to back: a gap of 16 floats before layer 1's tensor.
    auto* base = reinterpret_cast<std::byte*>(buffer.data());
    bases.push_back(base);
    bases.push_back(base + layout.layer_bytes() + 16 * sizeof(float));
    bases.push_back(base + 2 * layout.layer_bytes() + 16 * sizeof(float));
    view = KvPoolView(layout, bases);
  }
  float* layer_floats(uint32_t layer) { return reinterpret_cast<float*>(view.layer_base(layer)); }

  KvLayerLayout layout;
  std::vector<float> buffer;
  KvPoolView view;
};

TEST_CASE("KvPoolView key/value pointers match hand-computed offsets", "[cpu]") {
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    CAPTURE(static_cast<int>(order));
    Fixture f(order);
    auto index = order == KvOrder::kFlashAttn ? FlashAttnIndex : FlashInferIndex;
    REQUIRE(f.view.num_layers() == kLayers);
    REQUIRE(f.layout.layer_bytes() == size_t{2} * kBlocks * kBlockSize * kHeads * kHeadDim * 4);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      for (uint32_t block = 0; block < kBlocks; ++block) {
        for (uint32_t slot = 0; slot < kBlockSize; ++slot) {
          for (uint32_t head = 0; head < kHeads; ++head) {
            REQUIRE(f.view.key<float>(layer, block, slot, head) ==
                    f.layer_floats(layer) + index(0, block, slot, head));
            REQUIRE(f.view.value<float>(layer, block, slot, head) ==
                    f.layer_floats(layer) + index(1, block, slot, head));
          }
        }
      }
    }
  }
}

TEST_CASE("KvPoolView FlashAttention puts every K before every V", "[cpu]") {
  Fixture f(KvOrder::kFlashAttn);
  const float* last_key = f.view.key<float>(0, kBlocks - 1, kBlockSize - 1, kHeads - 1);
  const float* first_value = f.view.value<float>(0, 0, 0, 0);
  REQUIRE(first_value == last_key + kHeadDim);
  REQUIRE(first_value == f.layer_floats(0) + f.layout.layer_bytes() / 2 / sizeof(float));
}

TEST_CASE("KvPoolView FlashInfer interleaves K and V per block", "[cpu]") {
  Fixture f(KvOrder::kFlashInfer);
  const size_t plane_floats = kBlockSize * kHeads * kHeadDim;
  REQUIRE(f.view.value<float>(0, 0, 0, 0) == f.view.key<float>(0, 0, 0, 0) + plane_floats);
  REQUIRE(f.view.key<float>(0, 1, 0, 0) == f.view.value<float>(0, 0, 0, 0) + plane_floats);
}

TEST_CASE("KvPoolView writes through one accessor are read through the other", "[cpu]") {
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    Fixture f(order);
    f.view.key<float>(1, 3, 2, 1)[5] = 42.0f;
    f.view.value<float>(1, 3, 2, 1)[5] = -7.0f;
    const int64_t slot = 3 * kBlockSize + 2;
    REQUIRE(f.view.key_at_slot<float>(1, slot)[kHeadDim + 5] == 42.0f);
    REQUIRE(f.view.value_at_slot<float>(1, slot)[kHeadDim + 5] == -7.0f);
  }
}

TEST_CASE("KvPoolView Contains checks every coordinate", "[cpu]") {
  Fixture f(KvOrder::kFlashAttn);
  REQUIRE(f.view.Contains(0, 0, 0, 0));
  REQUIRE(f.view.Contains(kLayers - 1, kBlocks - 1, kBlockSize - 1, kHeads - 1));
  REQUIRE_FALSE(f.view.Contains(kLayers, 0, 0, 0));
  REQUIRE_FALSE(f.view.Contains(0, kBlocks, 0, 0));
  REQUIRE_FALSE(f.view.Contains(0, 0, kBlockSize, 0));
  REQUIRE_FALSE(f.view.Contains(0, 0, 0, kHeads));

  KvPoolView empty;
  REQUIRE(empty.num_layers() == 0);
  REQUIRE_FALSE(empty.Contains(0, 0, 0, 0));
}

TEST_CASE("KvPoolView key_at_slot agrees with key() for every slot", "[cpu]") {
  for (KvOrder order : {KvOrder::kFlashAttn, KvOrder::kFlashInfer}) {
    CAPTURE(static_cast<int>(order));
    Fixture f(order);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      for (int64_t slot = 0; slot < int64_t{kBlocks} * kBlockSize; ++slot) {
        const auto block = static_cast<uint32_t>(slot / kBlockSize);
        const auto offset = static_cast<uint32_t>(slot % kBlockSize);
        REQUIRE(f.view.key_at_slot<float>(layer, slot) ==
                f.view.key<float>(layer, block, offset, 0));
        REQUIRE(f.view.value_at_slot<float>(layer, slot) ==
                f.view.value<float>(layer, block, offset, 0));
        // The rest of the row is the other heads, back to back.
        REQUIRE(f.view.key_at_slot<float>(layer, slot) + kHeadDim ==
                f.view.key<float>(layer, block, offset, 1));
      }
    }
  }
}

TEST_CASE("KvPoolView 16-bit elements use 2-byte strides", "[cpu]") {
  const KvLayerLayout layout = MakeLayout(KvOrder::kFlashInfer, sizeof(uint16_t));
  std::vector<uint16_t> buffer(layout.layer_bytes() / sizeof(uint16_t));
  KvPoolView view(layout, {reinterpret_cast<std::byte*>(buffer.data())});
  REQUIRE(view.key<uint16_t>(0, 2, 1, 1) == buffer.data() + FlashInferIndex(0, 2, 1, 1));
  REQUIRE(view.value<uint16_t>(0, 4, 3, 0) == buffer.data() + FlashInferIndex(1, 4, 3, 0));
  REQUIRE(view.value<uint16_t>(0, 4, 3, 1) + kHeadDim == buffer.data() + buffer.size());
}

}  // namespace
}  // namespace cachemgr::client
