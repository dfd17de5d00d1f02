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
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachemgr/caller.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr {

class PeerPolicy;

// How long the daemon waits for a connected client's request (and for its reply to be taken)
// before dropping the connection, so a silent client cannot stall the single serving thread.
inline constexpr absl::Duration kShareRequestTimeout = absl::Seconds(1);
// How long FetchSharedFds waits for the daemon's reply (DEADLINE_EXCEEDED after that).
inline constexpr absl::Duration kShareFetchTimeout = absl::Seconds(30);

// Serves one connection at a time on one background thread; the resolver runs on that thread
// (so it must be thread-safe with respect to the rest of the daemon) and must not call Stop().
class ShareChannelServer {
 public:
  // Returns the descriptors (borrowed: the caller keeps them open until the reply is sent) for
  // a session token presented by `peer`, or an error status that is sent back to the client.
  using Resolver = std::function<absl::StatusOr<std::vector<int>>(const std::string& token,
                                                                  const PeerCredentials& peer)>;

  // Listens at `path` (mode 0600; see ListenSeqpacket for stale-file handling and errors) and
  // serves requests on a background thread until Stop(). A peer `policy` does not allow (it
  // must outlive the server) gets "ERR PERMISSION_DENIED ..."; a malformed request (not "SHARE
  // <token>",
  // token empty or containing whitespace/control bytes, or carrying descriptors) gets
  // "ERR INVALID_ARGUMENT ..."; a client silent for kShareRequestTimeout gets
  // "ERR DEADLINE_EXCEEDED ..." (if still there) and is disconnected.
  static absl::StatusOr<std::unique_ptr<ShareChannelServer>> Start(const std::string& path,
                                                                   const PeerPolicy* policy,
                                                                   Resolver resolver);
  ~ShareChannelServer();  // Stops.

  // Stops accepting, joins the thread, removes the socket file (only if it is still the socket
  // this server bound, so a successor's socket at the same path survives). Idempotent.
  void Stop();
  const std::string& path() const { return path_; }

 private:
  ShareChannelServer(std::string path, UniqueFd listener, const PeerPolicy* policy,
                     Resolver resolver);
  void Serve();
  void HandleConnection(UniqueFd conn);
  // Waits up to `timeout` for Stop(); true when stopping.
  bool WaitForStop(absl::Duration timeout);

  std::string path_;
  UniqueFd listener_;
  UniqueFd wake_read_, wake_write_;  // self-pipe that interrupts poll() on Stop().
  const PeerPolicy* policy_;
  Resolver resolver_;
  std::thread thread_;
  std::atomic<bool> stopped_{false};
  uint64_t socket_dev_ = 0, socket_ino_ = 0;  // identity of the socket file we bound.
};

// Client side: asks the daemon at `path` for the regions of `session_token`. Maps the daemon's
// "ERR <CODE> <message>" back to an absl::Status with that code and message (an unknown code
// gives UNKNOWN). UNAVAILABLE when no daemon listens or it hangs up without replying,
// DEADLINE_EXCEEDED after kShareFetchTimeout, DATA_LOSS when "OK <n>" arrives with a different
// number of descriptors, INTERNAL for an unparsable reply. Descriptors are close-on-exec.
absl::StatusOr<std::vector<UniqueFd>> FetchSharedFds(const std::string& path,
                                                     const std::string& session_token);

}  // namespace cachemgr
