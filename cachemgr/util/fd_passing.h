// Message + file-descriptor passing over AF_UNIX SOCK_SEQPACKET sockets (SCM_RIGHTS).
// SEQPACKET keeps message boundaries, so one call sends or receives exactly one message.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr {

// Largest payload one message may carry, and most descriptors (the kernel's SCM_MAX_FD).
inline constexpr size_t kMaxFdMessagePayload = 64 * 1024;
inline constexpr size_t kMaxFdsPerMessage = 253;

struct FdMessage {
  std::string payload;
  std::vector<UniqueFd> fds;
};

// Sends `payload` (<= kMaxFdMessagePayload bytes, may be empty) with `fds` (borrowed, not
// closed; at most kMaxFdsPerMessage). Retries EINTR. INVALID_ARGUMENT for limits, UNAVAILABLE
// when the peer is gone (EPIPE/ECONNRESET; uses MSG_NOSIGNAL), DEADLINE_EXCEEDED when a send
// timeout (SO_SNDTIMEO) expires or a non-blocking socket is full, INTERNAL otherwise.
absl::Status SendFdMessage(int socket_fd, std::string_view payload, absl::Span<const int> fds);

// Receives one message. Descriptors arrive owned (and close-on-exec). UNAVAILABLE on orderly
// shutdown by the peer (0 bytes), DATA_LOSS if the payload or control data was truncated
// (MSG_TRUNC / MSG_CTRUNC; any descriptors that did arrive are closed), DEADLINE_EXCEEDED when
// a receive timeout (SO_RCVTIMEO) expires or a non-blocking socket has nothing queued, INTERNAL
// otherwise. An empty message is told apart from EOF (SO_PASSCRED is enabled for the duration
// of the call and restored), so empty payloads round-trip.
absl::StatusOr<FdMessage> ReceiveFdMessage(int socket_fd);

// Creates a listening AF_UNIX SOCK_SEQPACKET socket at `path` with mode 0600, removing a stale
// socket file first (but refusing, with FAILED_PRECONDITION, to replace a non-socket file).
// INVALID_ARGUMENT when `path` is empty or does not fit sockaddr_un::sun_path. The fd is
// close-on-exec.
absl::StatusOr<UniqueFd> ListenSeqpacket(const std::string& path, int backlog = 64);

// Connects to a SOCK_SEQPACKET listener. UNAVAILABLE when nothing listens there (no file or
// connection refused), PERMISSION_DENIED on EACCES, INVALID_ARGUMENT for a bad path.
absl::StatusOr<UniqueFd> ConnectSeqpacket(const std::string& path);

}  // namespace cachemgr
