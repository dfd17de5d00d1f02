// The host half of mapped_region.h, and the CUDA stubs of builds without CACHEMGR_CUDA.
#include <sys/mman.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "client/src/mapped_region.h"

namespace cachemgr::client {
namespace {

absl::Status ErrnoError(int err, const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(err)));
}

class HostRegion final : public MappedRegion {
 public:
  HostRegion(std::byte* data, size_t bytes) : data_(data), bytes_(bytes) {}
  ~HostRegion() override { ::munmap(data_, bytes_); }
  HostRegion(const HostRegion&) = delete;
  HostRegion& operator=(const HostRegion&) = delete;

  std::byte* data() const override { return data_; }
  bool on_device() const override { return false; }

  absl::Status Revoke() override {
    if (revoked_) return absl::OkStatus();
    // One atomic replacement: there is no instant at which the range is unmapped (a stale store
    // would fault) or could be given to another mapping. MAP_NORESERVE: no commit charge for
    // memory nobody should touch.
    if (::mmap(data_, bytes_, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0) != MAP_FAILED) {
      revoked_ = true;
      return absl::OkStatus();
    }
    const int err = errno;
    // Still cut the pool off: stale accesses then fault instead of writing into it.
    if (::mprotect(data_, bytes_, PROT_NONE) == 0) {
      revoked_ = true;
      return absl::OkStatus();
    }
    return ErrnoError(err, "replacing the pool mapping with private memory");
  }

 private:
  std::byte* const data_;
  const size_t bytes_;
  bool revoked_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<MappedRegion>> MapHostRegion(UniqueFd fd, uint64_t bytes) {
  if (!fd.valid()) return absl::InvalidArgumentError("cannot map an invalid descriptor");
  if (bytes == 0) return absl::InvalidArgumentError("mapping size must be > 0");
  struct stat st = {};
  if (::fstat(fd.get(), &st) != 0) return ErrnoError(errno, "fstat of shared region");
  if (st.st_size < 0 || static_cast<uint64_t>(st.st_size) < bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared region is ", st.st_size, " bytes; expected at least ", bytes));
  }
  // Populated now (the daemon committed the pages): no page fault per 4 KiB on the KV path.
  void* data =
      ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd.get(), 0);
  if (data == MAP_FAILED) {
    const int err = errno;
    if (err == ENOMEM) {
      return absl::ResourceExhaustedError(
          absl::StrCat("mmap of ", bytes, " bytes of shared region: ", std::strerror(err)));
    }
    return ErrnoError(err, absl::StrCat("mmap of ", bytes, " bytes of shared region"));
  }
  return std::make_unique<HostRegion>(static_cast<std::byte*>(data), static_cast<size_t>(bytes));
}

#if !defined(CACHEMGR_CLIENT_CUDA)
bool CudaMappingAvailable() { return false; }

absl::StatusOr<std::unique_ptr<MappedRegion>> OpenCudaVmmRegion(const std::string& device_uuid,
                                                                UniqueFd, uint64_t) {
  return absl::UnimplementedError(
      absl::StrCat("the pool lives on ", device_uuid,
                   ": opening CUDA pools needs a client built with -DCACHEMGR_CUDA=ON"));
}

absl::StatusOr<std::unique_ptr<MappedRegion>> OpenCudaIpcRegion(const std::string& device_uuid,
                                                                const std::string&) {
  return OpenCudaVmmRegion(device_uuid, UniqueFd(), 0);
}

absl::StatusOr<std::unique_ptr<WriteEvent>> CreateWriteEvent(const std::string& device_uuid) {
  return absl::UnimplementedError(
      absl::StrCat("the pool lives on ", device_uuid,
                   ": CUDA write events need a client built with -DCACHEMGR_CUDA=ON"));
}
#endif

}  // namespace cachemgr::client
