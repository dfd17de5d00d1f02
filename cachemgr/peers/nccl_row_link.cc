#include "cachemgr/peers/nccl_row_link.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "cachemgr/peers/nccl_comm.h"

namespace cachemgr {
namespace {

constexpr char kKind[] = "nccl";
constexpr absl::Duration kPollSlice = absl::Microseconds(200);

absl::Status CudaStatus(cudaError_t err, const char* what) {
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), ": ", cudaGetErrorString(err)));
}

class DeviceBuffer final : public LinkBuffer {
 public:
  DeviceBuffer(int device, std::byte* ptr, uint64_t bytes)
      : device_(device), ptr_(ptr), bytes_(bytes) {}
  ~DeviceBuffer() override {
    cudaSetDevice(device_);
    cudaFree(ptr_);
  }
  std::byte* data() override { return ptr_; }
  uint64_t size() const override { return bytes_; }

 private:
  const int device_;
  std::byte* const ptr_;
  const uint64_t bytes_;
};

// Polls `comm` until its pending work is done in NCCL and, with `stream`, the stream has
// drained; aborts the communicator when the wait runs out, stops or `aborted` is set.
absl::Status Await(NcclComm& comm, cudaStream_t stream, const LinkWait& wait,
                   const std::atomic<bool>& aborted) {
  for (;;) {
    absl::StatusOr<bool> ready = comm.Ready();
    if (!ready.ok()) {
      comm.Abort();
      return absl::UnavailableError(
          absl::StrCat("the NCCL row link failed: ", ready.status().message()));
    }
    if (*ready && stream != nullptr) {
      const cudaError_t q = cudaStreamQuery(stream);
      if (q == cudaSuccess) return absl::OkStatus();
      if (q != cudaErrorNotReady) {
        comm.Abort();
        return CudaStatus(q, "the NCCL row link's stream");
      }
    } else if (*ready) {
      return absl::OkStatus();
    }
    absl::Status why;
    if (aborted.load()) {
      why = absl::AbortedError("the row link was aborted");
    } else if (wait.Stopped()) {
      why = absl::AbortedError("the transfer stopped");
    } else if (absl::Now() >= wait.deadline) {
      why = absl::DeadlineExceededError("the NCCL row link did not complete within the deadline");
    }
    if (!why.ok()) {
      comm.Abort();  // NCCL's pending work never completes otherwise
      return why;
    }
    absl::SleepFor(kPollSlice);
  }
}

class NcclRowLink final : public RowLink {
 public:
  NcclRowLink(NcclComm comm, cudaStream_t stream) : comm_(std::move(comm)), stream_(stream) {}
  ~NcclRowLink() override {
    cudaSetDevice(comm_.device());
    cudaStreamDestroy(stream_);
  }

  int device() const override { return comm_.device(); }

  absl::StatusOr<std::unique_ptr<LinkBuffer>> NewBuffer(uint64_t bytes) override {
    if (cudaError_t err = cudaSetDevice(comm_.device()); err != cudaSuccess) {
      return CudaStatus(err, "cudaSetDevice");
    }
    void* ptr = nullptr;
    if (cudaError_t err = cudaMalloc(&ptr, std::max<uint64_t>(bytes, 1)); err != cudaSuccess) {
      return absl::ResourceExhaustedError(absl::StrCat("a row link buffer of ", bytes,
                                                       " bytes on CUDA device ", comm_.device(),
                                                       ": ", cudaGetErrorString(err)));
    }
    return std::make_unique<DeviceBuffer>(comm_.device(), static_cast<std::byte*>(ptr), bytes);
  }

  absl::Status Send(const std::byte* data, uint64_t bytes, const LinkWait& wait) override {
    return Move(NcclComm::Op::Kind::kSend, const_cast<std::byte*>(data), bytes, wait);
  }
  absl::Status Recv(std::byte* data, uint64_t bytes, const LinkWait& wait) override {
    return Move(NcclComm::Op::Kind::kRecv, data, bytes, wait);
  }
  bool broken() const override { return broken_.load() || aborted_.load(); }
  void Abort() override { aborted_.store(true); }  // the thread in Await aborts NCCL

 private:
  absl::Status Move(NcclComm::Op::Kind kind, std::byte* data, uint64_t bytes,
                    const LinkWait& wait) {
    absl::MutexLock lock(&mu_);  // one operation at a time on the communicator
    if (broken()) return absl::FailedPreconditionError("the row link is broken");
    absl::Status s = [&]() -> absl::Status {
      if (cudaError_t err = cudaSetDevice(comm_.device()); err != cudaSuccess) {
        return CudaStatus(err, "cudaSetDevice");
      }
      const NcclComm::Op op{kind, data, bytes, /*peer=*/1 - comm_.rank()};
      if (absl::Status g = comm_.Group({&op, 1}, stream_); !g.ok()) return g;
      return Await(comm_, stream_, wait, aborted_);
    }();
    if (!s.ok()) {
      broken_.store(true);
      comm_.Abort();
    }
    return s;
  }

  absl::Mutex mu_;
  NcclComm comm_ ABSL_GUARDED_BY(mu_);
  const cudaStream_t stream_;
  std::atomic<bool> aborted_{false};
  std::atomic<bool> broken_{false};
};

// Joins `comm` (from NcclComm::Start) and wraps it in a link with a stream of its own.
absl::StatusOr<std::unique_ptr<RowLink>> Finish(NcclComm comm, const LinkWait& wait) {
  const std::atomic<bool> never{false};
  if (absl::Status s = Await(comm, nullptr, wait, never); !s.ok()) return s;
  if (cudaError_t err = cudaSetDevice(comm.device()); err != cudaSuccess) {
    return CudaStatus(err, "cudaSetDevice");
  }
  cudaStream_t stream = nullptr;
  if (cudaError_t err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
      err != cudaSuccess) {
    return CudaStatus(err, "cudaStreamCreateWithFlags");
  }
  return std::make_unique<NcclRowLink>(std::move(comm), stream);
}

class PendingNcclLink final : public PendingRowLink {
 public:
  PendingNcclLink(std::string offer, NcclComm comm)
      : offer_(std::move(offer)), comm_(std::move(comm)) {}
  const std::string& offer() const override { return offer_; }
  absl::StatusOr<std::unique_ptr<RowLink>> Complete(const LinkWait& wait) override {
    return Finish(std::move(comm_), wait);
  }

 private:
  const std::string offer_;
  NcclComm comm_;
};

class NcclRowLinkKind final : public RowLinkKind {
 public:
  explicit NcclRowLinkKind(std::vector<NcclDevice> devices) : devices_(std::move(devices)) {}

  std::string_view name() const override { return kKind; }
  bool Serves(int device) const override { return Find(device) != nullptr; }

  absl::Status CanJoin(std::string_view offer, int device) const override {
    if (offer.size() <= NCCL_UNIQUE_ID_BYTES) {
      return absl::InvalidArgumentError(
          absl::StrCat("header.row_link.offer is not an NCCL unique id and a device (",
                       NCCL_UNIQUE_ID_BYTES, " bytes and a UUID; got ", offer.size(), ")"));
    }
    const NcclDevice* mine = Find(device);
    if (mine == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("header.row_link.offer: the nccl row link does not serve device ", device));
    }
    const std::string_view sender = offer.substr(NCCL_UNIQUE_ID_BYTES);
    if (sender == mine->uuid) {
      return absl::FailedPreconditionError(
          absl::StrCat("header.row_link.offer: both pools are on GPU ", mine->uuid,
                       ", and NCCL links two GPUs; send without a row link"));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<PendingRowLink>> Offer(int device) override {
    if (!Serves(device)) {
      return absl::FailedPreconditionError(
          absl::StrCat("the nccl row link does not serve device ", device));
    }
    absl::StatusOr<std::string> id = NcclComm::NewUniqueId();
    if (!id.ok()) return id.status();
    // Rank 0 starts joining now; the receiver's join (rank 1) completes it.
    absl::StatusOr<NcclComm> comm = NcclComm::Start(device, 2, 0, *id);
    if (!comm.ok()) return comm.status();
    return std::make_unique<PendingNcclLink>(*std::move(id) + Find(device)->uuid, *std::move(comm));
  }

  absl::StatusOr<std::unique_ptr<RowLink>> Join(std::string_view offer, int device,
                                                const LinkWait& wait) override {
    if (absl::Status s = CanJoin(offer, device); !s.ok()) return s;
    absl::StatusOr<NcclComm> comm =
        NcclComm::Start(device, 2, 1, offer.substr(0, NCCL_UNIQUE_ID_BYTES));
    if (!comm.ok()) return comm.status();
    return Finish(*std::move(comm), wait);
  }

 private:
  const NcclDevice* Find(int ordinal) const {
    for (const NcclDevice& d : devices_) {
      if (d.ordinal == ordinal) return &d;
    }
    return nullptr;
  }

  const std::vector<NcclDevice> devices_;
};

}  // namespace

std::unique_ptr<RowLinkKind> NewNcclRowLinkKind(std::vector<NcclDevice> devices) {
  return std::make_unique<NcclRowLinkKind>(std::move(devices));
}

}  // namespace cachemgr
