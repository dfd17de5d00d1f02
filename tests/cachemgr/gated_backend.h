// A host backend whose pool memory can be made to block in DigestLayer (`armed`) or GatherTokens
// (`gather_armed`): tests of the calls that read KV outside the manager's lock (GetSequence's
// digests, StorePrefix, LoadPrefix, a background Compress) arm it, wait for `entered`, act while
// the call is outside the lock, then `release` it.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "cachemgr/backend/host_backend.h"

namespace cachemgr::testing {

// Host pool memory whose DigestLayer / GatherTokens block (once armed) until released.
class GatedMemory final : public PoolMemory {
 public:
  GatedMemory(std::unique_ptr<PoolMemory> inner, absl::Notification* entered,
              absl::Notification* release, std::atomic<bool>* armed,
              std::atomic<bool>* gather_armed)
      : inner_(std::move(inner)),
        entered_(entered),
        release_(release),
        armed_(armed),
        gather_armed_(gather_armed) {}

  const kernels::KvLayerLayout& layout() const override { return inner_->layout(); }
  const std::vector<RegionInfo>& regions() const override { return inner_->regions(); }
  const std::vector<LayerPlacement>& layers() const override { return inner_->layers(); }
  std::vector<int> ShareFds() const override { return inner_->ShareFds(); }
  absl::Status CopyBlocks(uint32_t layer, absl::Span<const kernels::BlockCopyPair> p) override {
    return inner_->CopyBlocks(layer, p);
  }
  absl::Status GatherTokens(uint32_t layer, absl::Span<const int64_t> slots, float* k,
                            float* v) const override {
    if (gather_armed_->exchange(false)) {
      entered_->Notify();
      release_->WaitForNotification();
    }
    return inner_->GatherTokens(layer, slots, k, v);
  }
  absl::Status ScatterTokens(uint32_t layer, absl::Span<const int64_t> slots, const float* k,
                             const float* v) override {
    return inner_->ScatterTokens(layer, slots, k, v);
  }
  absl::Status PackRows(uint32_t layer, absl::Span<const int64_t> slots, std::byte* k,
                        std::byte* v) const override {
    return inner_->PackRows(layer, slots, k, v);
  }
  absl::Status UnpackRows(uint32_t layer, absl::Span<const int64_t> slots, const std::byte* k,
                          const std::byte* v) override {
    return inner_->UnpackRows(layer, slots, k, v);
  }
  absl::Status CompactHeads(uint32_t layer, absl::Span<const uint32_t> table, uint32_t n,
                            absl::Span<const uint32_t> kept, uint32_t rows) override {
    return inner_->CompactHeads(layer, table, n, kept, rows);
  }
  absl::Status AttentionColumnSums(uint32_t layer, absl::Span<const int64_t> slots, uint32_t hq,
                                   const float* q, uint32_t nq, float* sums) const override {
    return inner_->AttentionColumnSums(layer, slots, hq, q, nq, sums);
  }
  absl::Status ScatterCodedRows(uint32_t layer, absl::Span<const int64_t> slots,
                                const compress::CodedRows& coded) override {
    return inner_->ScatterCodedRows(layer, slots, coded);
  }
  absl::StatusOr<uint64_t> DigestLayer(uint32_t layer, absl::Span<const uint32_t> table, uint32_t n,
                                       KvDigest kind) const override {
    if (armed_->exchange(false)) {
      entered_->Notify();
      release_->WaitForNotification();
    }
    return inner_->DigestLayer(layer, table, n, kind);
  }

 private:
  std::unique_ptr<PoolMemory> inner_;
  absl::Notification* entered_;
  absl::Notification* release_;
  std::atomic<bool>* armed_;
  std::atomic<bool>* gather_armed_;
};

// The host backend with CreatePool left to a subclass (host().CreatePool creates the memory).
class HostBackendWrapper : public DeviceBackend {
 public:
  BackendKind kind() const override { return host_.kind(); }
  ShareMethod share_method() const override { return host_.share_method(); }
  std::string device_name() const override { return host_.device_name(); }
  absl::StatusOr<uint64_t> PoolBytes(const kernels::KvLayerLayout& layout,
                                     uint32_t num_layers) const override {
    return host_.PoolBytes(layout, num_layers);
  }

 protected:
  HostBackend& host() { return host_; }

 private:
  HostBackend host_;
};

class GatedBackend final : public HostBackendWrapper {
 public:
  absl::StatusOr<std::unique_ptr<PoolMemory>> CreatePool(const std::string& pool_id,
                                                         const kernels::KvLayerLayout& layout,
                                                         kernels::KvElemType type,
                                                         uint32_t num_layers) override {
    auto inner = host().CreatePool(pool_id, layout, type, num_layers);
    if (!inner.ok()) return inner.status();
    return std::unique_ptr<PoolMemory>(
        new GatedMemory(*std::move(inner), &entered, &release, &armed, &gather_armed));
  }

  absl::Notification entered, release;
  std::atomic<bool> armed{false}, gather_armed{false};
};

}  // namespace cachemgr::testing
