// The host half of mapped_region.h, and the CUDA stubs of builds without CACHEMGR_CUDA.
#include "absl/strings/str_cat.h"
#include "cachemgr/host/memfd_region.h"
#include "client/src/mapped_region.h"

namespace cachemgr::client {
namespace {

class HostRegion final : public MappedRegion {
 public:
  explicit HostRegion(MemfdRegion region) : region_(std::move(region)) {}
  std::byte* data() const override { return region_.data(); }
  bool on_device() const override { return false; }

 private:
  MemfdRegion region_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<MappedRegion>> MapHostRegion(UniqueFd fd, uint64_t bytes) {
  absl::StatusOr<MemfdRegion> region = MemfdRegion::Map(std::move(fd), bytes);
  if (!region.ok()) return region.status();
  return std::make_unique<HostRegion>(*std::move(region));
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
