// MemfdRegion: an anonymous shared-memory region (memfd_create + mmap MAP_SHARED) and its fd.
//
// The daemon creates regions for the host backend's KV pools; a client maps the same region
// from the descriptor it receives over the share channel, so both processes see the same bytes.
// Move-only; the destructor unmaps and closes. Not thread-safe to move while others read data().
#pragma once

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr {

class MemfdRegion {
 public:
  // Creates a zero-filled region of `bytes` (> 0) named `name` (shows in /proc/PID/fd).
  // The memfd is sealed against shrinking (F_SEAL_SHRINK) so a client cannot truncate it
  // under the daemon; also F_SEAL_GROW (the size is fixed) and F_SEAL_SEAL (no process, the
  // daemon included, can add seals later, e.g. F_SEAL_FUTURE_WRITE to lock other clients out).
  // Names longer than 249 bytes are truncated. The memory is committed (fallocate) and the
  // mapping populated (MAP_POPULATE) before Create returns: a pool costs its RAM from creation,
  // as a device pool does, and nobody pays page faults on the KV path.
  // Errors: INVALID_ARGUMENT for bytes == 0, RESOURCE_EXHAUSTED when the kernel refuses the
  // memory or `bytes` exceeds the memory available (MemAvailable), INTERNAL for other syscall
  // failures (message carries errno).
  static absl::StatusOr<MemfdRegion> Create(const std::string& name, size_t bytes);

  // Maps an existing region received from another process. Checks with fstat that the fd is
  // at least `bytes` long (INVALID_ARGUMENT otherwise; also for bytes == 0 or an invalid fd).
  // Takes ownership of `fd`. Maps MAP_SHARED read-write, populated (MAP_POPULATE).
  static absl::StatusOr<MemfdRegion> Map(UniqueFd fd, size_t bytes);

  MemfdRegion() = default;
  MemfdRegion(MemfdRegion&& other) noexcept;
  MemfdRegion& operator=(MemfdRegion&& other) noexcept;
  MemfdRegion(const MemfdRegion&) = delete;
  MemfdRegion& operator=(const MemfdRegion&) = delete;
  ~MemfdRegion();

  std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  // The descriptor to pass to other processes; owned by this region.
  int fd() const { return fd_.get(); }

 private:
  MemfdRegion(UniqueFd fd, std::byte* data, size_t size)
      : fd_(std::move(fd)), data_(data), size_(size) {}
  void Reset();

  UniqueFd fd_;
  std::byte* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace cachemgr
