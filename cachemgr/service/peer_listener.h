// PeerListener: the daemon's gRPC Unix socket. The daemon accepts connections itself, instead
// of letting gRPC listen, so that it knows who is on the other end of each one: at accept it
// reads the peer's credentials from the kernel (SO_PEERCRED / SO_PEERGROUPS), closes the
// connection of a peer the PeerPolicy does not allow or that is over its connection cap, and
// otherwise remembers the credentials and hands the descriptor to gRPC
// (grpc::AddInsecureChannelFromFd). Every call on that connection can then ask who made it
// (Lookup with ServerContext::peer(), which gRPC names "fd:<descriptor>").
//
// Descriptor reuse: gRPC closes a connection's descriptor only when it destroys the connection's
// endpoint, which happens after the last call on the connection has been destroyed; a handler
// runs while its call exists, so the entry it finds for "fd:N" is the one written when its own
// connection was accepted (a later accept can reuse N only after that close). The residual
// race is a gRPC change that closed descriptors earlier: a call could then be attributed to a
// newer connection reusing the number. Both peers passed the PeerPolicy, and credentials only
// bind sessions to uids (operator rights come from the operator credential, never from a uid),
// so the worst case is a call acting with the uid of another allowed peer while carrying that
// peer's secret session token: no more than a stolen token gives.
//
// Exhaustion: when accept fails for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS,
// ENOMEM) the loop backs off (100 ms), logs (at most once per 10 s, with the count of failures)
// and retries; pending connections wait in the kernel's backlog meanwhile, and are served once
// descriptors are free again. The health probe (health_probe.h) notices a listener that stays
// stuck.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachemgr/caller.h"
#include "cachemgr/service/peer_policy.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr {

struct PeerListenerOptions {
  std::string path;
  // Socket file mode and group (chown) set before the socket accepts anything.
  mode_t mode = 0600;
  std::optional<gid_t> group;
  // Open connections allowed in total and per uid; a connection over either cap is closed at
  // accept. Connections from the daemon's own process (its health probe) are not counted.
  uint32_t max_connections = 1024;
  uint32_t max_connections_per_uid = 512;
};

class PeerListener {
 public:
  // Takes ownership of an accepted, non-blocking, close-on-exec connection descriptor.
  using HandOff = std::function<void(int fd)>;

  // `policy` must outlive the listener. Nothing is bound yet, so Lookup can be wired into the
  // service before the socket exists.
  PeerListener(PeerListenerOptions options, const PeerPolicy* policy);
  // Binds `options.path` (which must not exist: the daemon prepared it), sets its mode and
  // group, listens, and accepts on a background thread, passing admitted connections to
  // `hand_off` (called on that thread). Call once. INVALID_ARGUMENT for a path that does not
  // fit; INTERNAL / PERMISSION_DENIED (bind, chmod, chown) naming the path and errno.
  absl::Status Start(HandOff hand_off);
  ~PeerListener();  // Stops.

  // Stops accepting, joins the thread, closes the listening socket and removes its file if it
  // is still the socket this listener bound. Connections already handed off stay with gRPC.
  // Idempotent.
  void Stop();

  // Shuts down (shutdown(2), both directions) every connection handed to gRPC that is still the
  // socket accepted, so that writes pending on it fail: a peer that stopped reading (a stopped
  // process whose socket buffer is full) can then no longer hold up gRPC's shutdown, which waits
  // for every call. For the daemon's exit, after Stop(). Returns how many it shut down.
  size_t ShutdownConnections();

  // The credentials recorded at accept for the connection gRPC calls `grpc_peer` ("fd:N");
  // nullopt for anything else (TCP peers, unknown descriptors). Thread-safe.
  std::optional<PeerCredentials> Lookup(absl::string_view grpc_peer) const;

  // Connections accepted and not yet seen closed (stale entries are pruned when a cap is near).
  uint64_t connections() const;

 private:
  struct Connection {
    PeerCredentials peer;
    dev_t dev = 0;
    ino_t ino = 0;
    bool counted = true;  // false for the daemon's own process
  };

  void Serve();
  void Admit(UniqueFd conn);
  // Whether `peer` may open one more connection; prunes closed connections first when a cap
  // would be exceeded. Logs the refusal.
  bool WithinCapsLocked(const PeerCredentials& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PruneLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Waits up to `timeout` for Stop(); true when stopping.
  bool WaitForStop(absl::Duration timeout);
  // Logs `msg` at most once per 10 s per kind, with how many were suppressed in between.
  void RateLimitedWarning(int kind, std::string_view msg, std::string detail);

  const PeerListenerOptions options_;
  const PeerPolicy* const policy_;
  HandOff hand_off_;
  UniqueFd listener_;
  UniqueFd wake_read_, wake_write_;  // self-pipe that interrupts poll() on Stop().
  dev_t socket_dev_ = 0;
  ino_t socket_ino_ = 0;
  std::thread thread_;
  std::atomic<bool> stopped_{false};

  mutable absl::Mutex mu_;
  absl::flat_hash_map<int, Connection> connections_ ABSL_GUARDED_BY(mu_);
  uint64_t counted_total_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<uid_t, uint32_t> counted_per_uid_ ABSL_GUARDED_BY(mu_);

  // Rate limiting of warnings (Serve thread only).
  struct WarningState {
    absl::Time last = absl::InfinitePast();
    uint64_t suppressed = 0;
  };
  WarningState warnings_[3];
};

}  // namespace cachemgr
