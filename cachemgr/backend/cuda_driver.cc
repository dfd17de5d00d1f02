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

// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" from a cudaUUID_t's bytes.
std::string FormatGpuUuid(const unsigned char b[16]) {
  return absl::StrFormat("GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                         b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11],
                         b[12], b[13], b[14], b[15]);
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

absl::StatusOr<const CudaDriver*> LoadCudaDriver() {
  static const absl::StatusOr<CudaDriver>* loaded = new absl::StatusOr<CudaDriver>(Load());
  if (!loaded->ok()) return loaded->status();
  return &**loaded;
}

absl::StatusOr<std::vector<std::string>> CudaDeviceUuids() {
  int count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::FailedPreconditionError(absl::StrCat(
        "no CUDA device (", e != cudaSuccess ? cudaGetErrorString(e) : "none visible", ")"));
  }
  std::vector<std::string> uuids;
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop;
    if (cudaError_t e = cudaGetDeviceProperties(&prop, d); e != cudaSuccess) {
      cudaGetLastError();
      return absl::InternalError(
          absl::StrCat("cudaGetDeviceProperties(", d, "): ", cudaGetErrorString(e)));
    }
    uuids.push_back(FormatGpuUuid(reinterpret_cast<const unsigned char*>(prop.uuid.bytes)));
  }
  return uuids;
}

absl::StatusOr<std::unique_ptr<VmmMapping>> VmmMapping::Map(const CudaDriver* drv,
                                                            CUmemGenericAllocationHandle handle,
                                                            uint64_t bytes, size_t alignment,
                                                            int ordinal) {
  auto m = std::unique_ptr<VmmMapping>(new VmmMapping(drv, bytes));
  if (absl::Status s = drv->Check(drv->MemAddressReserve(&m->ptr_, bytes, alignment, 0, 0),
                                  "cuMemAddressReserve");
      !s.ok()) {
    m->ptr_ = 0;
    return s;
  }
  if (absl::Status s = drv->Check(drv->MemMap(m->ptr_, bytes, 0, handle, 0), "cuMemMap"); !s.ok()) {
    return s;
  }
  m->mapped_ = true;
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = ordinal;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  if (absl::Status s = drv->Check(drv->MemSetAccess(m->ptr_, bytes, &access, 1), "cuMemSetAccess");
      !s.ok()) {
    return s;
  }
  return m;
}

VmmMapping::~VmmMapping() {
  if (mapped_) drv_->MemUnmap(ptr_, bytes_);
  if (ptr_ != 0) drv_->MemAddressFree(ptr_, bytes_);
}

}  // namespace cachemgr
