// HostBackend: pools in memfd shared memory; clients map them with mmap after receiving the
// descriptor over the share channel. Runs the CPU twins of the kernels.
#pragma once

#include <memory>

#include "cachemgr/backend/device_backend.h"

namespace cachemgr {

class HostBackend final : public DeviceBackend {
 public:
  BackendKind kind() const override { return BackendKind::kHost; }
  ShareMethod share_method() const override { return ShareMethod::kMemfd; }
  std::string device_name() const override { return "host"; }

  // Every layer's tensor rounded up to whole pages, times the layers.
  absl::StatusOr<uint64_t> PoolBytes(const kernels::KvLayerLayout& layout,
                                     uint32_t num_layers) const override;

  // One memfd region holding every layer, each layer at a page-aligned offset.
  absl::StatusOr<std::unique_ptr<PoolMemory>> CreatePool(const std::string& pool_id,
                                                         const kernels::KvLayerLayout& layout,
                                                         kernels::KvElemType type,
                                                         uint32_t num_layers) override;
};

}  // namespace cachemgr
