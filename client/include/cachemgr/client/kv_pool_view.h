// KvPoolView: typed, per-layer access to a pool mapped into this process, in the negotiated
// layout (FlashAttention or FlashInfer order; see cachemgr/kernels/kv_layout.h).
//
// On a host pool the pointers are host addresses; on a CUDA pool (on_device()) they are device
// addresses on device(), for the engine's kernels (cudaMemcpy, reshape_and_cache, attention).
// Pointers stay valid while the owning Session lives. Accessors do no bounds checks beyond
// debug asserts (they sit on an engine's hot path); `Contains()` validates coordinates.
#pragma once

#include <cassert>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cachemgr/kernels/kv_layout.h"

namespace cachemgr::client {

class KvPoolView {
 public:
  KvPoolView() = default;
  // `layer_bases[l]` is where layer l's tensor starts; every layer shares `layout`.
  KvPoolView(kernels::KvLayerLayout layout, std::vector<std::byte*> layer_bases,
             bool on_device = false, std::string device = "host")
      : layout_(layout),
        layer_bases_(std::move(layer_bases)),
        on_device_(on_device),
        device_(std::move(device)) {}

  const kernels::KvLayerLayout& layout() const { return layout_; }
  bool on_device() const { return on_device_; }
  // "host", or the GPU's UUID.
  const std::string& device() const { return device_; }
  uint32_t num_layers() const { return static_cast<uint32_t>(layer_bases_.size()); }
  std::byte* layer_base(uint32_t layer) const {
    assert(layer < layer_bases_.size());
    return layer_bases_[layer];
  }

  bool Contains(uint32_t layer, uint32_t block, uint32_t slot, uint32_t head) const {
    return layer < num_layers() && block < layout_.num_blocks && slot < layout_.block_size &&
           head < layout_.num_kv_heads;
  }

  // One head's vector (head_dim elements of T) of K or V.
  template <typename T>
  T* key(uint32_t layer, uint32_t block, uint32_t slot, uint32_t head) const {
    return at<T>(kernels::KvPlane::kKey, layer, block, slot, head);
  }
  template <typename T>
  T* value(uint32_t layer, uint32_t block, uint32_t slot, uint32_t head) const {
    return at<T>(kernels::KvPlane::kValue, layer, block, slot, head);
  }
  // A whole token row (num_kv_heads * head_dim elements) addressed by a vLLM slot.
  template <typename T>
  T* key_at_slot(uint32_t layer, int64_t slot) const {
    return reinterpret_cast<T*>(layer_base(layer) +
                                layout_.slot_offset(kernels::KvPlane::kKey, slot));
  }
  template <typename T>
  T* value_at_slot(uint32_t layer, int64_t slot) const {
    return reinterpret_cast<T*>(layer_base(layer) +
                                layout_.slot_offset(kernels::KvPlane::kValue, slot));
  }

 private:
  template <typename T>
  T* at(kernels::KvPlane plane, uint32_t layer, uint32_t block, uint32_t slot,
        uint32_t head) const {
    assert(sizeof(T) == layout_.elem_bytes);
    assert(Contains(layer, block, slot, head));
    return reinterpret_cast<T*>(layer_base(layer) + layout_.head_offset(plane, block, slot, head));
  }

  kernels::KvLayerLayout layout_;
  std::vector<std::byte*> layer_bases_;
  bool on_device_ = false;
  std::string device_ = "host";
};

}  // namespace cachemgr::client
