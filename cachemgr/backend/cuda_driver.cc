#include "cachemgr/backend/cuda_driver.h"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace cachemgr {
namespace {

constexpr unsigned kDriverApiVersion = 12000;

template <typename Fn>
absl::Status Resolve(const char* name, Fn* out) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t err =
      cudaGetDriverEntryPointByVersion(name, &fn, kDriverApiVersion, cudaEnableDefault, &found);
  if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == nullptr) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("the CUDA driver does not provide ", name, " (",
                     err != cudaSuccess ? cudaGetErrorString(err) : "symbol not found",
                     "); is the NVIDIA driver installed?"));
  }
  *out = reinterpret_cast<Fn>(fn);
  return absl::OkStatus();
}

absl::StatusOr<CudaDriver> Load() {
  CudaDriver d{};
  for (absl::Status s :
       {Resolve("cuGetErrorName", &d.GetErrorName), Resolve("cuGetErrorString", &d.GetErrorString),
        Resolve("cuInit", &d.Init), Resolve("cuDeviceGet", &d.DeviceGet),
        Resolve("cuDeviceGetAttribute", &d.DeviceGetAttribute),
        Resolve("cuMemGetAllocationGranularity", &d.MemGetAllocationGranularity),
        Resolve("cuMemCreate", &d.MemCreate), Resolve("cuMemRelease", &d.MemRelease),
        Resolve("cuMemAddressReserve", &d.MemAddressReserve),
        Resolve("cuMemAddressFree", &d.MemAddressFree), Resolve("cuMemMap", &d.MemMap),
        Resolve("cuMemUnmap", &d.MemUnmap), Resolve("cuMemSetAccess", &d.MemSetAccess),
        Resolve("cuMemExportToShareableHandle", &d.MemExportToShareableHandle),
        Resolve("cuMemImportFromShareableHandle", &d.MemImportFromShareableHandle)}) {
    if (!s.ok()) return s;
  }
  if (absl::Status s = d.Check(d.Init(0), "cuInit"); !s.ok()) {
    return absl::FailedPreconditionError(s.message());
  }
  return d;
}

}  // namespace

absl::Status CudaDriver::Check(CUresult result, const char* what) const {
  if (result == CUDA_SUCCESS) return absl::OkStatus();
  const char* name = nullptr;
  const char* text = nullptr;
  if (GetErrorName != nullptr) GetErrorName(result, &name);
  if (GetErrorString != nullptr) GetErrorString(result, &text);
  return absl::InternalError(absl::StrCat(what, ": ", name != nullptr ? name : "CUresult ",
                                          name != nullptr ? "" : absl::StrCat(result), " (",
                                          text != nullptr ? text : "", ")"));
}

std::string FormatGpuUuid(const unsigned char b[16]) {
  return absl::StrFormat("GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                         b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11],
                         b[12], b[13], b[14], b[15]);
}

absl::StatusOr<const CudaDriver*> LoadCudaDriver() {
  static const absl::StatusOr<CudaDriver>* loaded = new absl::StatusOr<CudaDriver>(Load());
  if (!loaded->ok()) return loaded->status();
  return &**loaded;
}

}  // namespace cachemgr
