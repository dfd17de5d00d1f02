#include "cachemgr/util/instance_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace cachemgr {
namespace {

absl::Status ErrnoStatus(int err, absl::string_view what, const std::string& path) {
  const auto code = err == EACCES || err == EPERM ? absl::StatusCode::kPermissionDenied
                                                  : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, " ", path, ": ", std::strerror(err)));
}

std::string HolderPid(int fd) {
  char buf[32] = {};
  const ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
  if (n <= 0) return "unknown";
  return std::string(absl::StripAsciiWhitespace(absl::string_view(buf, static_cast<size_t>(n))));
}

}  // namespace

absl::StatusOr<std::unique_ptr<InstanceLock>> InstanceLock::Acquire(const std::string& path,
                                                                    const std::string& what) {
  // The file may be unlinked by its holder between our open and our flock; then we would hold
  // a lock on an orphaned inode. Re-check that the path still names the locked file, and retry.
  for (int attempt = 0; attempt < 10; ++attempt) {
    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (!fd.valid()) return ErrnoStatus(errno, "cannot open lock file", path);
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      if (err == EWOULDBLOCK) {
        return absl::FailedPreconditionError(
            absl::StrCat(what, ": another cachemgrd (pid ", HolderPid(fd.get()), ") holds ", path,
                         " and serves there; stop it first or choose other socket paths"));
      }
      return ErrnoStatus(err, "cannot lock", path);
    }
    struct stat by_fd = {}, by_path = {};
    if (::fstat(fd.get(), &by_fd) != 0) return ErrnoStatus(errno, "cannot stat", path);
    if (::stat(path.c_str(), &by_path) != 0 || by_fd.st_dev != by_path.st_dev ||
        by_fd.st_ino != by_path.st_ino) {
      continue;  // unlinked (or replaced) under us
    }
    const std::string pid = absl::StrCat(::getpid(), "\n");
    if (::ftruncate(fd.get(), 0) != 0 ||
        ::pwrite(fd.get(), pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
      return ErrnoStatus(errno, "cannot write pid to", path);
    }
    return std::unique_ptr<InstanceLock>(new InstanceLock(path, std::move(fd)));
  }
  return absl::UnavailableError(absl::StrCat("lock file ", path, " keeps being replaced"));
}

InstanceLock::~InstanceLock() {
  if (fd_.valid()) ::unlink(path_.c_str());
}

}  // namespace cachemgr
