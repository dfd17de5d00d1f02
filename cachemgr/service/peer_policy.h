// PeerPolicy: which local users may talk to the daemon over its Unix sockets (the gRPC socket
// and the share channel). The kernel names the peer of a connected Unix socket (SO_PEERCRED,
// SO_PEERGROUPS), so the check cannot be forged by the peer; it complements the sockets' file
// modes, which a careless chmod or a descriptor leaked into another process can bypass.
//
// Allowed: the daemon's effective uid, root, every uid listed in `allowed_uids`, and every
// process whose primary or supplementary groups include `group` (when set).
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cachemgr/caller.h"

namespace cachemgr {

class PeerPolicy {
 public:
  PeerPolicy(uid_t daemon_uid, std::vector<uid_t> allowed_uids, std::optional<gid_t> group);

  // Reads the credentials of the peer connected to `socket_fd` (a connected AF_UNIX socket) and
  // checks them. PERMISSION_DENIED naming the uid for a peer that is not allowed; INTERNAL when
  // the kernel cannot tell (getsockopt failed). Thread-safe (no state changes).
  absl::StatusOr<PeerCredentials> Check(int socket_fd) const;

  // Whether a peer with these credentials and supplementary `groups` is allowed.
  bool Allows(const PeerCredentials& peer, const std::vector<gid_t>& groups) const;

  // "uid 1000 (daemon), uid 0, uids 1001,1002, group 998" for the startup log line.
  std::string Describe() const;

 private:
  const uid_t daemon_uid_;
  const std::vector<uid_t> allowed_uids_;
  const std::optional<gid_t> group_;
};

// Resolves "alice" or "1000" to a uid / "cachemgr" or "998" to a gid. INVALID_ARGUMENT naming
// `flag` when no such user or group exists.
absl::StatusOr<uid_t> ResolveUser(const std::string& name, const char* flag);
absl::StatusOr<gid_t> ResolveGroup(const std::string& name, const char* flag);

}  // namespace cachemgr
