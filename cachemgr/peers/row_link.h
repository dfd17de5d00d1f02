// Row links: a point-to-point byte pipe between two daemons that carries the rows of a transfer
// beside its Peer.ReceiveSequence stream (docs/MULTINODE.md, "Row links"). The stream still
// carries the header (with the link's offer), the coded layers and the end with every layer's
// digest, which the receiver checks against the rows the link delivered, so a link moves bytes
// and nothing else. Kinds:
//   "nccl"    NCCL send/receive between CUDA devices of two daemons (CUDA builds,
//             nccl_row_link.h): the rows go from the source pool's device to the destination's
//             without touching host memory.
//   "socket"  one TCP connection (socket_row_link.h): raw rows without gRPC's framing, between
//             pools on any memory, and the CPU twin of the NCCL link's protocol (offer, join,
//             deadline, abort), which is how CI exercises it.
//
// The sender offers a link (PendingRowLink: opaque bytes that travel in the header, NCCL's
// unique id or a socket's address and nonce) and completes it while the receiver joins; both
// then Send and Recv whole buffers in the same order. A link serves one transfer at a time and
// may serve many in turn (RowLinkCache); one whose operation failed is broken and dropped.
// Every blocking call returns by its wait's deadline, or soon after its stop() answers true.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace cachemgr {

// How long a blocking link call may take: until `deadline`, and no longer than it takes to
// notice `stop` (polled every few milliseconds; may be empty) answering true, which fails the
// call with ABORTED.
struct LinkWait {
  absl::Time deadline = absl::InfiniteFuture();
  std::function<bool()> stop;

  bool Stopped() const { return stop && stop(); }
};

// Memory a link sends from and receives into: host memory, or a CUDA device's.
class LinkBuffer {
 public:
  virtual ~LinkBuffer() = default;
  virtual std::byte* data() = 0;
  virtual uint64_t size() const = 0;
};

class RowLink {
 public:
  virtual ~RowLink() = default;
  // The CUDA device whose memory Send and Recv take; -1: host memory.
  virtual int device() const = 0;
  // A buffer of `bytes` in that memory.
  virtual absl::StatusOr<std::unique_ptr<LinkBuffer>> NewBuffer(uint64_t bytes) = 0;
  // Sends / receives exactly `bytes` (both sides name the same counts in the same order).
  // DEADLINE_EXCEEDED, ABORTED (stop, or Abort), UNAVAILABLE (the peer went away) or INTERNAL
  // (the library's error); any failure breaks the link.
  virtual absl::Status Send(const std::byte* data, uint64_t bytes, const LinkWait& wait) = 0;
  virtual absl::Status Recv(std::byte* data, uint64_t bytes, const LinkWait& wait) = 0;
  // True once an operation failed or Abort ran: the link must not be used again.
  virtual bool broken() const = 0;
  // From any thread: fails the pending operation and every later one.
  virtual void Abort() = 0;
};

// The sender's half of a link being made.
class PendingRowLink {
 public:
  virtual ~PendingRowLink() = default;
  // What the receiver needs to join (RowLinkKind::Join), carried in the header.
  virtual const std::string& offer() const = 0;
  // Waits for the receiver to join; the link, or why not (DEADLINE_EXCEEDED, ABORTED).
  virtual absl::StatusOr<std::unique_ptr<RowLink>> Complete(const LinkWait& wait) = 0;
};

class RowLinkKind {
 public:
  virtual ~RowLinkKind() = default;
  virtual std::string_view name() const = 0;
  // Whether this kind links `device` (-1: host memory) of this daemon; a kind that cannot
  // (NCCL and the host) is not offered or joined for it.
  virtual bool Serves(int device) const = 0;
  // A new link from `device` of this daemon.
  virtual absl::StatusOr<std::unique_ptr<PendingRowLink>> Offer(int device) = 0;
  // Whether Join(offer, device) can work, checked before the receiver claims anything (a
  // refusal lets the sender fall back to the stream): INVALID_ARGUMENT for an offer this kind
  // did not make, FAILED_PRECONDITION for one it cannot join here; both name
  // header.row_link.offer.
  virtual absl::Status CanJoin(std::string_view offer, int device) const = 0;
  // Joins the link `offer` describes from `device` of this daemon (CanJoin's errors too).
  virtual absl::StatusOr<std::unique_ptr<RowLink>> Join(std::string_view offer, int device,
                                                        const LinkWait& wait) = 0;
};

}  // namespace cachemgr
