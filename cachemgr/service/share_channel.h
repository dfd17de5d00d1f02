// The share channel: a SOCK_SEQPACKET Unix socket beside the gRPC socket that hands the pool's
// memory (file descriptors) to attached clients, since gRPC cannot carry descriptors.
//
// Protocol (one request, one reply, then the daemon closes the connection):
//   client -> daemon: payload "SHARE <session_token>", no fds
//   daemon -> client: payload "OK <n>" with n descriptors (regions in PoolDescriptor order),
//                     or "ERR <CODE> <message>" with no descriptors (CODE: absl status code name,
//                     e.g. NOT_FOUND when the token names no attached client).
// The daemon also checks the peer's uid (SO_PEERCRED) equals its own, on top of the 0600 mode.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr {

class ShareChannelServer {
 public:
  // Returns the descriptors (borrowed: the caller keeps them open until the reply is sent) for
  // a session token, or an error status that is sent back to the client.
  using Resolver = std::function<absl::StatusOr<std::vector<int>>(const std::string& token)>;

  // Listens at `path` (mode 0600) and serves requests on a background thread until Stop().
  static absl::StatusOr<std::unique_ptr<ShareChannelServer>> Start(const std::string& path,
                                                                   Resolver resolver);
  ~ShareChannelServer();  // Stops.

  // Stops accepting, joins the thread, removes the socket file. Idempotent.
  void Stop();
  const std::string& path() const { return path_; }

 private:
  ShareChannelServer(std::string path, UniqueFd listener, Resolver resolver);
  void Serve();

  std::string path_;
  UniqueFd listener_;
  UniqueFd wake_read_, wake_write_;  // self-pipe that interrupts poll() on Stop().
  Resolver resolver_;
  std::thread thread_;
  std::atomic<bool> stopped_{false};
};

// Client side: asks the daemon at `path` for the regions of `session_token`. Maps the daemon's
// "ERR <CODE> <message>" back to an absl::Status with that code and message.
absl::StatusOr<std::vector<UniqueFd>> FetchSharedFds(const std::string& path,
                                                     const std::string& session_token);

}  // namespace cachemgr
