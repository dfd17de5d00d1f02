// NcclComm: one rank of an NCCL communicator on one CUDA device (CUDA builds only), the
// transport between device pools of different daemons (docs/MULTINODE.md): the rank that
// starts a transfer makes a unique id, passes it to the other over the peer gRPC channel, both
// join, and the pools' bytes move with point-to-point sends and receives on the pools' streams.
//
// Move-only; the destructor destroys the communicator (after Abort, if a peer went away: NCCL
// operations waiting on a dead peer never complete otherwise). Not thread-safe: one thread uses
// a communicator at a time.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace cachemgr {

class NcclComm {
 public:
  // A new communicator id: NCCL_UNIQUE_ID_BYTES opaque bytes, made by one rank and given to
  // every other (it names the first rank's bootstrap socket). INTERNAL naming NCCL's error.
  static absl::StatusOr<std::string> NewUniqueId();

  // Joins communicator `unique_id` as `rank` of `nranks` on CUDA device `device`; blocks until
  // every rank has joined. INVALID_ARGUMENT for a unique id of the wrong size or a rank outside
  // [0, nranks); INTERNAL naming NCCL's or CUDA's error otherwise.
  static absl::StatusOr<NcclComm> Init(int device, int nranks, int rank,
                                       std::string_view unique_id);

  // Starts joining communicator `unique_id` without blocking (NCCL's non-blocking
  // communicators): poll Ready() until it answers true, Abort() to give up. Same errors as Init.
  static absl::StatusOr<NcclComm> Start(int device, int nranks, int rank,
                                        std::string_view unique_id);
  // For a communicator from Start: whether its initialization, and every operation enqueued
  // since, has completed in NCCL (false: still in progress). INTERNAL naming NCCL's error (a
  // peer that failed or went away) otherwise.
  absl::StatusOr<bool> Ready();

  // One point-to-point operation: send `bytes` from `buffer` to rank `peer`, or receive them.
  struct Op {
    enum class Kind { kSend, kRecv } kind;
    void* buffer;
    size_t bytes;
    int peer;
  };
  // Enqueues `ops` on `stream` as one NCCL group, so a rank may send to itself and two ranks
  // may exchange without deadlock; returns once enqueued (synchronize the stream to wait; a
  // communicator from Start has enqueued once Ready() answers true).
  // INVALID_ARGUMENT for a peer outside the communicator; INTERNAL naming NCCL's error.
  absl::Status Group(absl::Span<const Op> ops, cudaStream_t stream);

  // Stops the communicator's pending operations (a peer that died or stalled); the
  // communicator is unusable afterwards.
  void Abort();

  NcclComm(NcclComm&& other) noexcept;
  NcclComm& operator=(NcclComm&& other) noexcept;
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  ~NcclComm();

  int device() const { return device_; }
  int rank() const { return rank_; }
  int nranks() const { return nranks_; }

 private:
  NcclComm(ncclComm_t comm, int device, int rank, int nranks)
      : comm_(comm), device_(device), rank_(rank), nranks_(nranks) {}
  static absl::StatusOr<NcclComm> Create(int device, int nranks, int rank,
                                         std::string_view unique_id, bool blocking);
  void Reset();

  ncclComm_t comm_ = nullptr;
  int device_ = -1;
  int rank_ = 0;
  int nranks_ = 0;
  bool aborted_ = false;
};

}  // namespace cachemgr
