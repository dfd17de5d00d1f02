// SendSequence: a transfer between daemons (docs/MULTINODE.md). Streams a sequence being
// exported (CacheManager::BeginExport) to a peer's Peer.ReceiveSequence: the header, the coded
// layers, the rows of every other layer in chunks (or, given a row link, the rows over the link
// beside the stream: peers/row_link.h), and an end carrying each layer's digest, which the peer
// checks before the sequence becomes visible there.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/peers/row_links.h"
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
  // The rows go over this row link (an idle one, or a pending offer SendSequence completes,
  // leaving the link in it) rather than the stream; null: the stream. Its link is aborted when
  // the transfer fails (RowLinks::Release then closes it).
  RowLinks::SenderLease* link = nullptr;
  // Rows per link message are as many as fit this.
  uint64_t link_chunk_bytes = uint64_t{64} << 20;
};

struct SendResult {
  std::string destination_sequence_id;
  uint64_t payload_bytes = 0;  // row bytes sent (K and V), by the stream or the link
  uint64_t wire_bytes = 0;     // serialized bytes of every message the stream sent
  uint64_t link_bytes = 0;     // row bytes the link carried
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
