// CudaBackend: pools in the device memory of one GPU, shared with engine processes in place
// (zero copy) by one of the two CUDA IPC paths (CACHEMGR_CUDA builds only):
//
//   kCudaVmmFd      cuMemCreate with a POSIX-fd shareable handle, mapped into the daemon with
//                   cuMemMap; the fd from cuMemExportToShareableHandle goes to the client over
//                   the share channel exactly like the host backend's memfd, and the client
//                   imports and maps it (cuMemImportFromShareableHandle). The path that works
//                   beside engines that allocate with the VMM API (vLLM).
//   kCudaIpcHandle  cudaMalloc + cudaIpcGetMemHandle; the 64-byte handle travels in the
//                   AttachResponse (MemoryRegion.cuda_ipc_handle) and the client opens it once
//                   per pool (cudaIpcOpenMemHandle).
//
// One region per pool holds every layer (each at a 2 MiB-aligned offset). The device is chosen
// by UUID ("GPU-8d2c...", as nvidia-smi -L prints) or ordinal; device_name() is its UUID.
// Kernels run on the pool's own stream and every PoolMemory call returns after they finished,
// so an RPC's reply orders the daemon's work before the client's next access. The other
// direction: the client either completes its writes (synchronises its stream) before Compress
// / Park, which read the pool, or records a CUDA interprocess event after them and passes its
// handle with the call (OpenClientEvent); the daemon then waits for the event first.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "cachemgr/backend/device_backend.h"

namespace cachemgr {

struct CudaDriver;

struct CudaBackendOptions {
  std::string device = "0";  // UUID ("GPU-...") or ordinal
  ShareMethod share_method = ShareMethod::kCudaVmmFd;
};

class CudaBackend final : public DeviceBackend {
 public:
  // Selects the device and checks that the share method works on it (VMM: the device reports
  // POSIX-fd handle support; legacy IPC: a probe allocation exports a handle). No fallback:
  // FAILED_PRECONDITION says what is missing (no device, unknown UUID, method unsupported).
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const CudaBackendOptions& options);

  BackendKind kind() const override { return BackendKind::kCuda; }
  ShareMethod share_method() const override { return share_method_; }
  std::string device_name() const override { return uuid_; }
  int ordinal() const { return ordinal_; }

  // cudaIpcOpenEventHandle on this device.
  absl::StatusOr<std::unique_ptr<ClientEvent>> OpenClientEvent(
      const std::string& handle) const override;

  // The layers at 2 MiB-aligned strides; with vmm_fd rounded up to cuMemCreate's granularity.
  absl::StatusOr<uint64_t> PoolBytes(const kernels::KvLayerLayout& layout,
                                     uint32_t num_layers) const override;

  absl::StatusOr<std::unique_ptr<PoolMemory>> CreatePool(const std::string& pool_id,
                                                         const kernels::KvLayerLayout& layout,
                                                         kernels::KvElemType type,
                                                         uint32_t num_layers) override;

 private:
  CudaBackend(const CudaDriver* driver, int ordinal, std::string uuid, ShareMethod method)
      : driver_(driver), ordinal_(ordinal), uuid_(std::move(uuid)), share_method_(method) {}

  const CudaDriver* driver_;
  int ordinal_;
  std::string uuid_;
  ShareMethod share_method_;
};

}  // namespace cachemgr
