// SendSequence: the host transport of a transfer between daemons (docs/MULTINODE.md). Streams a
// sequence being exported (CacheManager::BeginExport) to a peer's Peer.ReceiveSequence: the
// header, the rows of every layer in chunks, and an end carrying each layer's digest, which
// the peer checks before the sequence becomes visible there.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachemgr/cache_manager.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"

namespace cachemgr {

// The largest message a daemon receives (its gRPC servers' limit).
inline constexpr uint64_t kMaxPeerMessageBytes = uint64_t{16} << 20;

struct SendOptions {
  std::string transfer_id;
  std::string destination_session_token;
  std::string destination_sequence_id;
  std::string sender_boot_id;
  absl::Time deadline;
  // Rows per message are as many as fit this (at least one row).
  uint64_t chunk_bytes = uint64_t{4} << 20;
};

struct SendResult {
  std::string destination_sequence_id;
  uint64_t payload_bytes = 0;  // row bytes sent (K and V)
  uint64_t wire_bytes = 0;     // serialized bytes of every message sent
  std::vector<uint64_t> layer_digests;
  bool replayed = false;  // the peer had completed this transfer_id before
};

// Sends `sequence` (its rows read outside the manager's lock, as each message is written)
// through `channel`; `authenticate` adds the peer credentials to the call's context. Returns by
// options.deadline (plus 200 ms) whatever the peer does: a peer's failure comes back as its
// status (a stream that broke as UNAVAILABLE, the deadline as DEADLINE_EXCEEDED), the
// sender's own read failures as theirs. The peer keeps nothing of a failed stream; only when
// the whole stream had left before the deadline can a peer that resumes late still commit it
// (its ledger then answers the retry).
absl::StatusOr<SendResult> SendSequence(
    const std::shared_ptr<grpc::Channel>& channel,
    const std::function<void(grpc::ClientContext*)>& authenticate,
    const SequenceInTransit& sequence, const SendOptions& options);

}  // namespace cachemgr
