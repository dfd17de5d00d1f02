// The CUDA half of mapped_region.h (CACHEMGR_CUDA builds): pools the daemon's CudaBackend
// exports, opened once per Session.
#include <cuda_runtime.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "cachemgr/backend/cuda_driver.h"
#include "cachemgr/util/status_macros.h"
#include "client/src/mapped_region.h"

namespace cachemgr::client {
namespace {

absl::Status Runtime(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

// The ordinal of the device with this UUID.
absl::StatusOr<int> DeviceOrdinal(const std::string& uuid) {
  absl::StatusOr<std::vector<std::string>> uuids = CudaDeviceUuids();
  if (!uuids.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the pool lives on ", uuid, " but this process sees ", uuids.status().message()));
  }
  for (int d = 0; d < static_cast<int>(uuids->size()); ++d) {
    if ((*uuids)[d] == uuid) return d;
  }
  return absl::FailedPreconditionError(
      absl::StrCat("the pool lives on ", uuid,
                   ", which this process does not see (check CUDA_VISIBLE_DEVICES and the node)"));
}

class VmmRegion final : public MappedRegion {
 public:
  explicit VmmRegion(const CudaDriver* drv) : drv_(drv) {}
  ~VmmRegion() override {
    UnmapScratch();
    mapping_.reset();  // unmapped before the imported handle is released
    if (imported_) drv_->MemRelease(handle_);
    if (scratch_created_) drv_->MemRelease(scratch_);
  }
  std::byte* data() const override { return mapping_->data(); }
  bool on_device() const override { return true; }

  absl::Status Open(int ordinal, int fd, uint64_t bytes) {
    ordinal_ = ordinal;
    bytes_ = bytes;
    if (absl::Status s = drv_->Check(
            drv_->MemImportFromShareableHandle(&handle_, reinterpret_cast<void*>(uintptr_t(fd)),
                                               CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
            "cuMemImportFromShareableHandle");
        !s.ok()) {
      return s;
    }
    imported_ = true;
    CUmemAllocationProp prop = DeviceProp();
    if (absl::Status s = drv_->Check(drv_->MemGetAllocationGranularity(
                                         &granularity_, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
                                     "cuMemGetAllocationGranularity");
        !s.ok()) {
      return s;
    }
    absl::StatusOr<std::unique_ptr<VmmMapping>> mapping =
        VmmMapping::Map(drv_, handle_, bytes, granularity_, ordinal);
    if (!mapping.ok()) return mapping.status();
    mapping_ = *std::move(mapping);
    return absl::OkStatus();
  }

  absl::Status Revoke() override {
    if (revoked_) return absl::OkStatus();
    const CUdeviceptr base = reinterpret_cast<CUdeviceptr>(mapping_->data());
    // The reservation stays (VmmMapping frees it at destruction), so the range is never given
    // to another allocation while stale pointers into it may exist.
    if (absl::Status s = drv_->Check(drv_->MemUnmap(base, bytes_), "cuMemUnmap"); !s.ok()) {
      return s;
    }
    revoked_ = true;
    drv_->MemRelease(handle_);  // this process no longer keeps the pool's memory alive
    imported_ = false;
    // Back the range with one private granule mapped everywhere, so stale device stores land
    // in scratch instead of faulting (which would poison the engine's CUDA context). Best
    // effort: an unmapped range is safe too.
    (void)MapScratch(base);
    return absl::OkStatus();
  }

 private:
  CUmemAllocationProp DeviceProp() const {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = ordinal_;
    return prop;
  }

  absl::Status MapScratch(CUdeviceptr base) {
    if (granularity_ == 0 || bytes_ % granularity_ != 0) {
      return absl::FailedPreconditionError("region size is not a multiple of the granularity");
    }
    CUmemAllocationProp prop = DeviceProp();
    if (absl::Status s =
            drv_->Check(drv_->MemCreate(&scratch_, granularity_, &prop, 0), "cuMemCreate");
        !s.ok()) {
      return s;
    }
    scratch_created_ = true;
    for (uint64_t off = 0; off < bytes_; off += granularity_) {
      if (absl::Status s =
              drv_->Check(drv_->MemMap(base + off, granularity_, 0, scratch_, 0), "cuMemMap");
          !s.ok()) {
        return s;
      }
      scratch_mapped_ = off + granularity_;
    }
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = ordinal_;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    return drv_->Check(drv_->MemSetAccess(base, bytes_, &access, 1), "cuMemSetAccess");
  }

  void UnmapScratch() {
    if (mapping_ == nullptr) return;
    const CUdeviceptr base = reinterpret_cast<CUdeviceptr>(mapping_->data());
    for (uint64_t off = 0; off < scratch_mapped_; off += granularity_) {
      drv_->MemUnmap(base + off, granularity_);
    }
    scratch_mapped_ = 0;
  }

  const CudaDriver* drv_;
  int ordinal_ = 0;
  uint64_t bytes_ = 0;
  size_t granularity_ = 0;
  CUmemGenericAllocationHandle handle_{};
  bool imported_ = false;
  std::unique_ptr<VmmMapping> mapping_;
  bool revoked_ = false;
  CUmemGenericAllocationHandle scratch_{};
  bool scratch_created_ = false;
  uint64_t scratch_mapped_ = 0;  // bytes of the range backed by scratch
};

class IpcRegion final : public MappedRegion {
 public:
  explicit IpcRegion(int ordinal) : ordinal_(ordinal) {}
  ~IpcRegion() override { (void)Revoke(); }
  std::byte* data() const override { return static_cast<std::byte*>(ptr_); }
  bool on_device() const override { return true; }

  absl::Status Open(const std::string& bytes) {
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, bytes.data(), sizeof(handle));
    RETURN_IF_ERROR(Runtime(cudaIpcOpenMemHandle(&ptr_, handle, cudaIpcMemLazyEnablePeerAccess),
                            "cudaIpcOpenMemHandle"));
    open_ = true;
    return absl::OkStatus();
  }

  // data() keeps returning the old address: views built from it stay well-defined values.
  absl::Status Revoke() override {
    if (!open_) return absl::OkStatus();
    RETURN_IF_ERROR(Runtime(cudaSetDevice(ordinal_), "cudaSetDevice"));
    RETURN_IF_ERROR(Runtime(cudaIpcCloseMemHandle(ptr_), "cudaIpcCloseMemHandle"));
    open_ = false;
    return absl::OkStatus();
  }

 private:
  const int ordinal_;
  void* ptr_ = nullptr;
  bool open_ = false;
};

class CudaWriteEvent final : public WriteEvent {
 public:
  explicit CudaWriteEvent(int ordinal) : ordinal_(ordinal) {}
  ~CudaWriteEvent() override {
    if (event_ != nullptr) cudaEventDestroy(event_);
  }

  absl::Status Create() {
    if (absl::Status s = Runtime(cudaSetDevice(ordinal_), "cudaSetDevice"); !s.ok()) return s;
    if (absl::Status s = Runtime(
            cudaEventCreateWithFlags(&event_, cudaEventInterprocess | cudaEventDisableTiming),
            "cudaEventCreateWithFlags");
        !s.ok()) {
      return s;
    }
    cudaIpcEventHandle_t h;
    if (absl::Status s = Runtime(cudaIpcGetEventHandle(&h, event_), "cudaIpcGetEventHandle");
        !s.ok()) {
      return s;
    }
    handle_.assign(reinterpret_cast<const char*>(&h), sizeof(h));
    return absl::OkStatus();
  }

  absl::Status Record(void* stream) override {
    if (absl::Status s = Runtime(cudaSetDevice(ordinal_), "cudaSetDevice"); !s.ok()) return s;
    return Runtime(cudaEventRecord(event_, static_cast<cudaStream_t>(stream)), "cudaEventRecord");
  }
  const std::string& handle() const override { return handle_; }

 private:
  const int ordinal_;
  cudaEvent_t event_ = nullptr;
  std::string handle_;
};

}  // namespace

bool CudaMappingAvailable() { return true; }

absl::StatusOr<std::unique_ptr<WriteEvent>> CreateWriteEvent(const std::string& device_uuid) {
  absl::StatusOr<int> ordinal = DeviceOrdinal(device_uuid);
  if (!ordinal.ok()) return ordinal.status();
  auto event = std::make_unique<CudaWriteEvent>(*ordinal);
  if (absl::Status s = event->Create(); !s.ok()) return s;
  return event;
}

absl::StatusOr<std::unique_ptr<MappedRegion>> OpenCudaVmmRegion(const std::string& device_uuid,
                                                                UniqueFd fd, uint64_t bytes) {
  absl::StatusOr<int> ordinal = DeviceOrdinal(device_uuid);
  if (!ordinal.ok()) return ordinal.status();
  absl::StatusOr<const CudaDriver*> drv = LoadCudaDriver();
  if (!drv.ok()) return drv.status();
  if (absl::Status s = Runtime(cudaSetDevice(*ordinal), "cudaSetDevice"); !s.ok()) return s;
  auto region = std::make_unique<VmmRegion>(*drv);
  if (absl::Status s = region->Open(*ordinal, fd.get(), bytes); !s.ok()) return s;
  return region;  // the imported handle keeps the allocation; the fd closes here
}

absl::StatusOr<std::unique_ptr<MappedRegion>> OpenCudaIpcRegion(const std::string& device_uuid,
                                                                const std::string& handle) {
  if (handle.size() != sizeof(cudaIpcMemHandle_t)) {
    return absl::DataLossError(absl::StrCat("daemon sent a ", handle.size(),
                                            "-byte CUDA IPC handle (want ",
                                            sizeof(cudaIpcMemHandle_t), ")"));
  }
  absl::StatusOr<int> ordinal = DeviceOrdinal(device_uuid);
  if (!ordinal.ok()) return ordinal.status();
  if (absl::Status s = Runtime(cudaSetDevice(*ordinal), "cudaSetDevice"); !s.ok()) return s;
  auto region = std::make_unique<IpcRegion>(*ordinal);
  if (absl::Status s = region->Open(handle); !s.ok()) return s;
  return region;
}

}  // namespace cachemgr::client
