// The CUDA driver functions cachemgr needs (the VMM API for pool sharing), resolved at run time
// through the runtime's cudaGetDriverEntryPointByVersion instead of linking libcuda: a
// CACHEMGR_CUDA build of cachemgrd still starts, and serves --backend=host, on a machine with
// no NVIDIA driver.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace cachemgr {

struct CudaDriver {
  decltype(&::cuGetErrorName) GetErrorName;
  decltype(&::cuGetErrorString) GetErrorString;
  decltype(&::cuInit) Init;
  decltype(&::cuDeviceGet) DeviceGet;
  decltype(&::cuDeviceGetAttribute) DeviceGetAttribute;
  decltype(&::cuMemGetAllocationGranularity) MemGetAllocationGranularity;
  decltype(&::cuMemCreate) MemCreate;
  decltype(&::cuMemRelease) MemRelease;
  decltype(&::cuMemAddressReserve) MemAddressReserve;
  decltype(&::cuMemAddressFree) MemAddressFree;
  decltype(&::cuMemMap) MemMap;
  decltype(&::cuMemUnmap) MemUnmap;
  decltype(&::cuMemSetAccess) MemSetAccess;
  decltype(&::cuMemExportToShareableHandle) MemExportToShareableHandle;
  decltype(&::cuMemImportFromShareableHandle) MemImportFromShareableHandle;

  // OK, or INTERNAL "what: CUDA_ERROR_NAME (description)".
  absl::Status Check(CUresult result, const char* what) const;
};

// Resolves every function once (thread-safe) and calls cuInit. FAILED_PRECONDITION when the
// driver is missing or too old, naming the function.
absl::StatusOr<const CudaDriver*> LoadCudaDriver();

// The UUID of every device this process sees, by ordinal, as nvidia-smi -L prints them
// ("GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"). FAILED_PRECONDITION "no CUDA device (why)" when
// it sees none.
absl::StatusOr<std::vector<std::string>> CudaDeviceUuids();

// A VMM allocation `handle` of `bytes` mapped read-write for device `ordinal` at an address
// aligned to `alignment` (cuMemAddressReserve, cuMemMap, cuMemSetAccess). The destructor unmaps
// it and frees the address range; releasing `handle` stays with the caller, after this is gone.
class VmmMapping {
 public:
  static absl::StatusOr<std::unique_ptr<VmmMapping>> Map(const CudaDriver* drv,
                                                         CUmemGenericAllocationHandle handle,
                                                         uint64_t bytes, size_t alignment,
                                                         int ordinal);
  ~VmmMapping();
  VmmMapping(const VmmMapping&) = delete;
  VmmMapping& operator=(const VmmMapping&) = delete;

  std::byte* data() const { return reinterpret_cast<std::byte*>(ptr_); }

 private:
  VmmMapping(const CudaDriver* drv, uint64_t bytes) : drv_(drv), bytes_(bytes) {}
  const CudaDriver* drv_;
  uint64_t bytes_;
  CUdeviceptr ptr_ = 0;
  bool mapped_ = false;
};

}  // namespace cachemgr
