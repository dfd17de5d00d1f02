#include "cachemgr/service/peer_policy.h"

#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace cachemgr {
namespace {

// The supplementary groups of the peer (SO_PEERGROUPS, Linux >= 4.13): the groups it had when
// it connected. Empty when the kernel does not support the option.
std::vector<gid_t> PeerGroups(int fd) {
  std::vector<gid_t> groups(64);
  for (int attempt = 0; attempt < 2; ++attempt) {
    socklen_t len = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &len) == 0) {
      groups.resize(len / sizeof(gid_t));
      return groups;
    }
    if (errno != ERANGE) break;
    groups.resize(len / sizeof(gid_t) + 1);  // the kernel reported the size it needs
  }
  return {};
}

}  // namespace

PeerPolicy::PeerPolicy(uid_t daemon_uid, std::vector<uid_t> allowed_uids,
                       std::optional<gid_t> group)
    : daemon_uid_(daemon_uid), allowed_uids_(std::move(allowed_uids)), group_(group) {}

bool PeerPolicy::Allows(const PeerCredentials& peer, const std::vector<gid_t>& groups) const {
  if (peer.uid == daemon_uid_ || peer.uid == 0) return true;
  if (std::find(allowed_uids_.begin(), allowed_uids_.end(), peer.uid) != allowed_uids_.end()) {
    return true;
  }
  if (!group_.has_value()) return false;
  return peer.gid == *group_ || std::find(groups.begin(), groups.end(), *group_) != groups.end();
}

absl::StatusOr<PeerCredentials> PeerPolicy::Check(int socket_fd) const {
  ucred cred = {};
  socklen_t len = sizeof(cred);
  if (::getsockopt(socket_fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    const int err = errno;
    return absl::InternalError(absl::StrCat("SO_PEERCRED: ", std::strerror(err)));
  }
  PeerCredentials peer{cred.pid, cred.uid, cred.gid};
  // Supplementary groups are read only when they could matter.
  std::vector<gid_t> groups;
  if (group_.has_value() && peer.uid != daemon_uid_ && peer.uid != 0 && peer.gid != *group_) {
    groups = PeerGroups(socket_fd);
  }
  if (!Allows(peer, groups)) {
    return absl::PermissionDeniedError(
        absl::StrCat("uid ", peer.uid, " (pid ", peer.pid,
                     ") may not use this daemon (allowed: ", Describe(), ")"));
  }
  return peer;
}

std::string PeerPolicy::Describe() const {
  std::string out = absl::StrCat("uid ", daemon_uid_, " (daemon), uid 0");
  if (!allowed_uids_.empty()) absl::StrAppend(&out, ", uids ", absl::StrJoin(allowed_uids_, ","));
  if (group_.has_value()) absl::StrAppend(&out, ", group ", *group_);
  return out;
}

absl::StatusOr<uid_t> ResolveUser(const std::string& name, const char* flag) {
  uint32_t numeric = 0;
  if (absl::SimpleAtoi(name, &numeric)) return static_cast<uid_t>(numeric);
  passwd entry = {};
  passwd* found = nullptr;
  std::vector<char> buffer(16384);
  if (::getpwnam_r(name.c_str(), &entry, buffer.data(), buffer.size(), &found) != 0 ||
      found == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": no user \"", name, "\""));
  }
  return found->pw_uid;
}

absl::StatusOr<gid_t> ResolveGroup(const std::string& name, const char* flag) {
  uint32_t numeric = 0;
  if (absl::SimpleAtoi(name, &numeric)) return static_cast<gid_t>(numeric);
  group entry = {};
  group* found = nullptr;
  std::vector<char> buffer(65536);
  if (::getgrnam_r(name.c_str(), &entry, buffer.data(), buffer.size(), &found) != 0 ||
      found == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": no group \"", name, "\""));
  }
  return found->gr_gid;
}

}  // namespace cachemgr
