#include "cachemgr/host/memfd_region.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"

namespace cachemgr {
namespace {

// memfd_create rejects names longer than this (NAME_MAX minus the "memfd:" prefix).
constexpr size_t kMaxMemfdNameLength = 249;

absl::Status ErrnoStatus(int err, const std::string& what) {
  const std::string text = absl::StrCat(what, ": ", std::strerror(err), " (errno ", err, ")");
  if (err == ENOMEM || err == EMFILE || err == ENFILE || err == ENOSPC || err == EFBIG) {
    return absl::ResourceExhaustedError(text);
  }
  return absl::InternalError(text);
}

// MAP_POPULATE: the page tables are filled now, in one pass, instead of by one fault per 4 KiB
// page at first touch (measured here: first writes into a fresh mapping run at 1 GB/s, into a
// populated one at 14 GB/s; docs/PERF.md "Host pools are committed and populated").
absl::StatusOr<std::byte*> MapShared(int fd, size_t bytes) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (p == MAP_FAILED) {
    return ErrnoStatus(errno, absl::StrCat("mmap of ", bytes, " bytes"));
  }
  return static_cast<std::byte*>(p);
}

// The kernel's estimate of memory available without swapping (/proc/meminfo MemAvailable), or
// nullopt if it cannot be read.
std::optional<uint64_t> AvailableMemoryBytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return std::nullopt;
}

}  // namespace

absl::StatusOr<MemfdRegion> MemfdRegion::Create(const std::string& name, size_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("memfd region size must be > 0");
  // A long name is only a debugging label; truncate rather than fail.
  const std::string label = name.substr(0, kMaxMemfdNameLength);
  UniqueFd fd(::memfd_create(label.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return ErrnoStatus(errno, absl::StrCat("memfd_create \"", label, "\""));
  if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
    return ErrnoStatus(errno, absl::StrCat("ftruncate memfd to ", bytes, " bytes"));
  }
  // Commits the memory now: a region the kernel cannot back fails here (RESOURCE_EXHAUSTED),
  // not with SIGBUS in whichever process first touches a page it cannot allocate. shmem's
  // fallocate would take pages until the OOM killer stepped in rather than fail, so a region
  // larger than the memory available is refused before it starts.
  if (const std::optional<uint64_t> available = AvailableMemoryBytes();
      available.has_value() && bytes > *available) {
    return absl::ResourceExhaustedError(
        absl::StrCat("a shared-memory region of ", bytes, " bytes is more than the ", *available,
                     " bytes of memory available (MemAvailable) to back it"));
  }
  if (const int err = ::posix_fallocate(fd.get(), 0, static_cast<off_t>(bytes)); err != 0) {
    return ErrnoStatus(err, absl::StrCat("fallocate memfd of ", bytes, " bytes"));
  }
  // SHRINK: a client truncating the file would SIGBUS the daemon's mapping. GROW: the size is
  // fixed by contract. SEAL: stops a client adding F_SEAL_FUTURE_WRITE, which would make later
  // clients' writable mappings fail.
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return ErrnoStatus(errno, "fcntl(F_ADD_SEALS) on memfd");
  }
  auto data = MapShared(fd.get(), bytes);
  if (!data.ok()) return data.status();
  return MemfdRegion(std::move(fd), *data, bytes);
}

absl::StatusOr<MemfdRegion> MemfdRegion::Map(UniqueFd fd, size_t bytes) {
  if (!fd.valid()) return absl::InvalidArgumentError("cannot map an invalid descriptor");
  if (bytes == 0) return absl::InvalidArgumentError("mapping size must be > 0");
  struct stat st = {};
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(errno, "fstat of shared region");
  if (st.st_size < 0 || static_cast<uint64_t>(st.st_size) < bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared region is ", st.st_size, " bytes; expected at least ", bytes));
  }
  auto data = MapShared(fd.get(), bytes);
  if (!data.ok()) return data.status();
  return MemfdRegion(std::move(fd), *data, bytes);
}

MemfdRegion::MemfdRegion(MemfdRegion&& other) noexcept
    : fd_(std::move(other.fd_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

MemfdRegion& MemfdRegion::operator=(MemfdRegion&& other) noexcept {
  if (this != &other) {
    Reset();
    fd_ = std::move(other.fd_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

MemfdRegion::~MemfdRegion() { Reset(); }

void MemfdRegion::Reset() {
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
  fd_.reset();
}

}  // namespace cachemgr
