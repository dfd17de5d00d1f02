// The share channel: a SOCK_SEQPACKET Unix socket beside the gRPC socket that hands the pool's
// memory (file descriptors) to attached clients, since gRPC cannot carry descriptors.
//
// Protocol (one request, one reply, then the daemon closes the connection):
//   client -> daemon: payload "SHARE <session_token>", no fds
//   daemon -> client: payload "OK <n>" with n descriptors (regions in PoolDescriptor order),
//                     or "ERR <CODE> <message>" with no descriptors (CODE: absl status code name,
//                     e.g. NOT_FOUND when the token names no attached client).
// The daemon also checks the peer's credentials (SO_PEERCRED) against its PeerPolicy, the same
// one the gRPC socket applies, on top of the socket's mode, and hands them to the resolver so
// that a session's descriptors go only to the uid that attached it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "cachemgr/caller.h"
#include "cachemgr/util/fd_passing.h"
#include "cachemgr/util/log.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr {

class PeerPolicy;

// How long the daemon waits for a connected client's request before dropping the connection.
inline constexpr absl::Duration kShareRequestTimeout = absl::Seconds(1);
// Most connections the daemon holds open at once waiting for their request.
inline constexpr size_t kMaxShareConnections = 64;
// How long the daemon stops accepting after accept() fails (e.g. EMFILE: out of descriptors);
// connections already open keep being served meanwhile.
inline constexpr absl::Duration kShareAcceptBackoff = absl::Milliseconds(100);
// How long FetchSharedFds waits for the daemon's reply (DEADLINE_EXCEEDED after that).
inline constexpr absl::Duration kShareFetchTimeout = absl::Seconds(30);

struct ShareChannelLimits {
  absl::Duration request_timeout = kShareRequestTimeout;  // > 0
  size_t max_connections = kMaxShareConnections;          // >= 1
};

// Serves every connection from one event-loop thread (poll over the listener and all open
// connections, each with its own deadline), so no number of idle or slow peers delays another
// client's reply beyond that client's own round trip plus the resolver calls of requests that
// arrived with it:
//   - a connection whose request is already queued when it is accepted is answered at once;
//     otherwise it waits, without blocking anyone, until its request arrives or
//     `request_timeout` passes (then it gets "ERR DEADLINE_EXCEEDED ..." and is closed);
//   - at most `max_connections` connections wait at once: accepting one more closes the oldest
//     waiting one with "ERR RESOURCE_EXHAUSTED ..." (a warning is logged, at most once a
//     second with the count since the last one), so a flood of idle peers evicts itself
//     rather than a client that sends its request as it connects;
//   - when accept() fails (e.g. EMFILE: out of descriptors), accepting pauses for
//     kShareAcceptBackoff (warning logged, throttled) and resumes on its own; the
//     connections already open are served meanwhile, and pending ones stay queued in the
//     listen backlog.
// Replies are sent without blocking (a reply the peer's socket cannot take is dropped with a
// throttled warning). The resolver runs on the serving thread, one call at a time, and its
// descriptors are sent before the next call; it must be thread-safe with respect to the rest of the
// daemon and must not call Stop().
class ShareChannelServer {
 public:
  // Returns the descriptors (borrowed: the caller keeps them open until the reply is sent, i.e.
  // until the next resolver call or Stop()) for a session token presented by `peer`, or an
  // error status that is sent back to the client.
  using Resolver = std::function<absl::StatusOr<std::vector<int>>(const std::string& token,
                                                                  const PeerCredentials& peer)>;

  // Listens at `path` (mode 0600; see ListenSeqpacket for stale-file handling and errors) and
  // serves requests on a background thread until Stop(). A peer `policy` does not allow (it
  // must outlive the server) gets "ERR PERMISSION_DENIED ..."; a malformed request (not
  // "SHARE <token>", token empty or containing whitespace/control bytes, or carrying
  // descriptors) gets
  // "ERR INVALID_ARGUMENT ...". INVALID_ARGUMENT for a missing resolver or limits out of range.
  static absl::StatusOr<std::unique_ptr<ShareChannelServer>> Start(const std::string& path,
                                                                   const PeerPolicy* policy,
                                                                   Resolver resolver,
                                                                   ShareChannelLimits limits = {});
  ~ShareChannelServer();  // Stops.

  // Stops accepting, joins the thread, closes every open connection (their peers see EOF),
  // removes the socket file (only if it is still the socket this server bound, so a
  // successor's socket at the same path survives). Idempotent; not thread-safe against itself.
  void Stop();
  const std::string& path() const { return path_; }

 private:
  // A connection waiting for its request.
  struct Waiting {
    UniqueFd conn;
    absl::Time deadline;
  };

  ShareChannelServer(std::string path, UniqueFd listener, const PeerPolicy* policy,
                     Resolver resolver, ShareChannelLimits limits);
  void Serve();
  // Accepts what the backlog holds (bounded per call); false when the listener failed for good.
  bool AcceptPending(absl::Time now);
  // Tries to read `conn`'s request without blocking; true when the connection is done with
  // (answered or gone), false when nothing has arrived yet.
  bool TryServe(int conn);
  void HandleRequest(int conn, FdMessage request);
  // Sends without blocking; a failure is logged (throttled: a peer that hangs up early is
  // routine for a hostile one).
  void SendReply(int conn, std::string_view payload, absl::Span<const int> fds);
  // Closes the oldest waiting connection with `reply` (an error).
  void DropOldest(const absl::Status& reply);
  // Waits up to `timeout` for Stop(); true when stopping.
  bool WaitForStop(absl::Duration timeout);

  std::string path_;
  UniqueFd listener_;
  UniqueFd wake_read_, wake_write_;  // self-pipe that interrupts poll() on Stop().
  const PeerPolicy* policy_;
  Resolver resolver_;
  const ShareChannelLimits limits_;
  std::thread thread_;
  std::atomic<bool> stopped_{false};
  uint64_t socket_dev_ = 0, socket_ino_ = 0;  // identity of the socket file we bound.

  // Only the serving thread touches these. waiting_: oldest first, so deadlines ascend.
  std::deque<Waiting> waiting_;
  absl::Time accept_paused_until_ = absl::InfinitePast();
  ThrottledLog evictions_{LogLevel::kWarning,
                          "share channel: connection limit reached; closed the oldest waiting "
                          "connection"};
  ThrottledLog accept_failures_{LogLevel::kWarning,
                                "share channel: accept failed; pausing accepts"};
  ThrottledLog undelivered_{LogLevel::kWarning, "share channel: reply not delivered"};
  ThrottledLog rejected_peers_{LogLevel::kWarning, "share channel: rejected peer"};
};

// Client side: asks the daemon at `path` for the regions of `session_token`. Maps the daemon's
// "ERR <CODE> <message>" back to an absl::Status with that code and message (an unknown code
// gives UNKNOWN). UNAVAILABLE when no daemon listens or it hangs up without replying,
// DEADLINE_EXCEEDED after kShareFetchTimeout, DATA_LOSS when "OK <n>" arrives with a different
// number of descriptors, INTERNAL for an unparsable reply. Descriptors are close-on-exec.
absl::StatusOr<std::vector<UniqueFd>> FetchSharedFds(const std::string& path,
                                                     const std::string& session_token);

}  // namespace cachemgr
