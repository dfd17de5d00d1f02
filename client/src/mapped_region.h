// A pool region mapped into the client: host shared memory (memfd + mmap) or, in CACHEMGR_CUDA
// builds, GPU memory opened through CUDA IPC (cuda_region.cc). Unmapped on destruction.
//
// Revoke() is how a client that lost its lease stops writing into blocks the daemon may have
// handed to someone else: the region's addresses stay valid for stale pointers, but no longer
// reach the pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr::client {

class MappedRegion {
 public:
  virtual ~MappedRegion() = default;
  // Host address (memfd) or device address (CUDA) of the region's first byte.
  virtual std::byte* data() const = 0;
  virtual bool on_device() const = 0;
  // Cuts the region off the pool, keeping its address range reserved so a stale pointer never
  // reaches another mapping either; drops this process's reference to the pool's memory.
  //   host:            the range is replaced in place by private anonymous memory (mmap
  //                    MAP_FIXED): later loads and stores work, on private bytes;
  //   CUDA VMM:        the pool allocation is unmapped (cuMemUnmap) and released, and the range
  //                    is backed by one private scratch allocation mapped over every granule,
  //                    so stale device stores land in scratch; if that fails the range stays
  //                    unmapped (stale accesses fault: CUDA_ERROR_ILLEGAL_ADDRESS);
  //   CUDA IPC handle: the handle is closed (cudaIpcCloseMemHandle); stale device pointers then
  //                    fault, or reach a later allocation of this process that reuses the
  //                    range, never the pool (the legacy API cannot keep the range reserved).
  // Idempotent. An error means the region may still reach the pool (the caller reports it).
  virtual absl::Status Revoke() = 0;
};

// mmap of a memfd region of `bytes` (MAP_SHARED; checked with fstat to be at least that long).
// The descriptor is closed once mapped: after Revoke() nothing in this process holds the pool.
absl::StatusOr<std::unique_ptr<MappedRegion>> MapHostRegion(UniqueFd fd, uint64_t bytes);

// Whether this build can open CUDA pools.
bool CudaMappingAvailable();

// The GPU named by `device_uuid` ("GPU-..."): imports a VMM allocation's POSIX fd of `bytes`
// and maps it read-write (cuMemImportFromShareableHandle, cuMemMap, cuMemSetAccess) ...
absl::StatusOr<std::unique_ptr<MappedRegion>> OpenCudaVmmRegion(const std::string& device_uuid,
                                                                UniqueFd fd, uint64_t bytes);
// ... or opens a legacy cudaIpcMemHandle_t (64 bytes) once.
absl::StatusOr<std::unique_ptr<MappedRegion>> OpenCudaIpcRegion(const std::string& device_uuid,
                                                                const std::string& handle);

// A CUDA interprocess event (cudaEventInterprocess | cudaEventDisableTiming) on the pool's
// device: recorded after the client's KV writes, its handle lets the daemon wait for them
// instead of the client synchronising (Session::RecordKvWrites).
class WriteEvent {
 public:
  virtual ~WriteEvent() = default;
  // cudaEventRecord on `stream` (a cudaStream_t; null: the legacy default stream).
  virtual absl::Status Record(void* stream) = 0;
  // The 64-byte cudaIpcEventHandle_t.
  virtual const std::string& handle() const = 0;
};

// Creates the event on the device named by `device_uuid`; FAILED_PRECONDITION in a build
// without CUDA or when this process does not see that device.
absl::StatusOr<std::unique_ptr<WriteEvent>> CreateWriteEvent(const std::string& device_uuid);

}  // namespace cachemgr::client
