// The CUDA driver functions cachemgr needs (the VMM API for pool sharing), resolved at run time
// through the runtime's cudaGetDriverEntryPointByVersion instead of linking libcuda: a
// CACHEMGR_CUDA build of cachemgrd still starts, and serves --backend=host, on a machine with
// no NVIDIA driver.
#pragma once

#include <cuda.h>

#include <string>

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

// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (as nvidia-smi -L prints) from a cudaUUID_t's bytes.
std::string FormatGpuUuid(const unsigned char bytes[16]);

// Resolves every function once (thread-safe) and calls cuInit. FAILED_PRECONDITION when the
// driver is missing or too old, naming the function.
absl::StatusOr<const CudaDriver*> LoadCudaDriver();

}  // namespace cachemgr
