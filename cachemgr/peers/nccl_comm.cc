#include "cachemgr/peers/nccl_comm.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace cachemgr {
namespace {

absl::Status NcclError(ncclResult_t result, const char* what, ncclComm_t comm = nullptr) {
  const char* detail = ncclGetLastError(comm);
  return absl::InternalError(absl::StrCat(
      what, ": ", ncclGetErrorString(result), detail != nullptr && *detail != '\0' ? " (" : "",
      detail != nullptr ? detail : "", detail != nullptr && *detail != '\0' ? ")" : ""));
}

}  // namespace

absl::StatusOr<std::string> NcclComm::NewUniqueId() {
  ncclUniqueId id;
  if (const ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
    return NcclError(r, "ncclGetUniqueId");
  }
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<NcclComm> NcclComm::Init(int device, int nranks, int rank,
                                        std::string_view unique_id) {
  return Create(device, nranks, rank, unique_id, /*blocking=*/true);
}

absl::StatusOr<NcclComm> NcclComm::Start(int device, int nranks, int rank,
                                         std::string_view unique_id) {
  return Create(device, nranks, rank, unique_id, /*blocking=*/false);
}

absl::StatusOr<NcclComm> NcclComm::Create(int device, int nranks, int rank,
                                          std::string_view unique_id, bool blocking) {
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return absl::InvalidArgumentError(absl::StrCat("an NCCL unique id is ", sizeof(id.internal),
                                                   " bytes, not ", unique_id.size()));
  }
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, " is not in a communicator of ", nranks, " ranks"));
  }
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  if (const cudaError_t err = cudaSetDevice(device); err != cudaSuccess) {
    return absl::InternalError(absl::StrCat("cudaSetDevice(", device, "): ", cudaGetErrorName(err),
                                            ": ", cudaGetErrorString(err)));
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = blocking ? 1 : 0;
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, nranks, id, rank, &config);
  if (r != ncclSuccess && !(r == ncclInProgress && !blocking)) {
    if (comm != nullptr) ncclCommAbort(comm);
    return NcclError(r, "ncclCommInitRankConfig");
  }
  return NcclComm(comm, device, rank, nranks);
}

absl::StatusOr<bool> NcclComm::Ready() {
  if (comm_ == nullptr || aborted_) {
    return absl::FailedPreconditionError("the NCCL communicator was aborted or moved from");
  }
  ncclResult_t state = ncclSuccess;
  if (const ncclResult_t r = ncclCommGetAsyncError(comm_, &state); r != ncclSuccess) {
    return NcclError(r, "ncclCommGetAsyncError", comm_);
  }
  if (state == ncclInProgress) return false;
  if (state != ncclSuccess) return NcclError(state, "NCCL", comm_);
  return true;
}

absl::Status NcclComm::Group(absl::Span<const Op> ops, cudaStream_t stream) {
  if (comm_ == nullptr || aborted_) {
    return absl::FailedPreconditionError("the NCCL communicator was aborted or moved from");
  }
  for (const Op& op : ops) {
    if (op.peer < 0 || op.peer >= nranks_) {
      return absl::InvalidArgumentError(
          absl::StrCat("peer ", op.peer, " is not in a communicator of ", nranks_, " ranks"));
    }
  }
  if (const ncclResult_t r = ncclGroupStart(); r != ncclSuccess) {
    return NcclError(r, "ncclGroupStart", comm_);
  }
  ncclResult_t failed = ncclSuccess;
  for (const Op& op : ops) {
    failed = op.kind == Op::Kind::kSend
                 ? ncclSend(op.buffer, op.bytes, ncclUint8, op.peer, comm_, stream)
                 : ncclRecv(op.buffer, op.bytes, ncclUint8, op.peer, comm_, stream);
    if (failed != ncclSuccess) break;
  }
  // The group is closed even after a failed call (NCCL's contract). A non-blocking communicator
  // answers ncclInProgress while it enqueues: Ready() says when that is done.
  const ncclResult_t ended = ncclGroupEnd();
  if (failed != ncclSuccess && failed != ncclInProgress) {
    return NcclError(failed, "ncclSend/ncclRecv", comm_);
  }
  if (ended != ncclSuccess && ended != ncclInProgress)
    return NcclError(ended, "ncclGroupEnd", comm_);
  return absl::OkStatus();
}

void NcclComm::Abort() {
  if (comm_ != nullptr && !aborted_) {
    ncclCommAbort(comm_);
    comm_ = nullptr;
    aborted_ = true;
  }
}

NcclComm::NcclComm(NcclComm&& other) noexcept
    : comm_(std::exchange(other.comm_, nullptr)),
      device_(other.device_),
      rank_(other.rank_),
      nranks_(other.nranks_),
      aborted_(other.aborted_) {}

NcclComm& NcclComm::operator=(NcclComm&& other) noexcept {
  if (this != &other) {
    Reset();
    comm_ = std::exchange(other.comm_, nullptr);
    device_ = other.device_;
    rank_ = other.rank_;
    nranks_ = other.nranks_;
    aborted_ = other.aborted_;
  }
  return *this;
}

NcclComm::~NcclComm() { Reset(); }

void NcclComm::Reset() {
  if (comm_ != nullptr) ncclCommDestroy(comm_);
  comm_ = nullptr;
}

}  // namespace cachemgr
