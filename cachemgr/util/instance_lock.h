// InstanceLock: an exclusive flock(2) on a lock file, held for the owner's lifetime, so that a
// second daemon cannot take over a live daemon's socket (it refuses to start instead). The
// kernel drops the lock when the holder dies, so a crash never leaves a stale lock behind.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr {

class InstanceLock {
 public:
  // Locks `path` (created mode 0600 if missing) and writes the caller's pid into it.
  // FAILED_PRECONDITION "<what>: another cachemgrd (pid N) holds <path>" when another process
  // holds it; INTERNAL / PERMISSION_DENIED naming the path when it cannot be opened.
  static absl::StatusOr<std::unique_ptr<InstanceLock>> Acquire(const std::string& path,
                                                               const std::string& what);
  // Removes the file (still holding the lock, so no one can have locked the same inode through
  // this path meanwhile), then unlocks.
  ~InstanceLock();
  InstanceLock(const InstanceLock&) = delete;
  InstanceLock& operator=(const InstanceLock&) = delete;

 private:
  InstanceLock(std::string path, UniqueFd fd) : path_(std::move(path)), fd_(std::move(fd)) {}

  const std::string path_;
  UniqueFd fd_;
};

}  // namespace cachemgr
