#include "cachemgr/service/peer_listener.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cachemgr/util/log.h"

namespace cachemgr {
namespace {

constexpr absl::Duration kExhaustedBackoff = absl::Milliseconds(100);
constexpr absl::Duration kWarningInterval = absl::Seconds(10);
constexpr int kBacklog = 1024;

enum WarningKind { kAcceptFailed = 0, kPeerDenied = 1, kOverCap = 2 };

std::string ErrnoText(int err) { return absl::StrCat(std::strerror(err), " (errno ", err, ")"); }

absl::Status ErrnoStatus(int err, absl::string_view what) {
  const auto code = err == EACCES || err == EPERM ? absl::StatusCode::kPermissionDenied
                                                  : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, ": ", ErrnoText(err)));
}

}  // namespace

PeerListener::PeerListener(PeerListenerOptions options, const PeerPolicy* policy)
    : options_(std::move(options)), policy_(policy) {}

absl::Status PeerListener::Start(HandOff hand_off) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (options_.path.empty() || options_.path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("socket path \"", options_.path, "\" is empty or too long"));
  }
  std::memcpy(addr.sun_path, options_.path.data(), options_.path.size());
  listener_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!listener_.valid()) return ErrnoStatus(errno, "socket(AF_UNIX, SOCK_STREAM)");
  if (::bind(listener_.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    listener_.reset();
    return ErrnoStatus(err, absl::StrCat("bind \"", options_.path, "\""));
  }
  // Mode and group before listen(): until then connect() is refused, so nobody connects through
  // the default mode the file was created with.
  auto undo = [&](int err, absl::string_view what) {
    ::unlink(options_.path.c_str());
    listener_.reset();
    return ErrnoStatus(err, absl::StrCat(what, " \"", options_.path, "\""));
  };
  if (options_.group.has_value() && ::chown(options_.path.c_str(), -1, *options_.group) != 0) {
    return undo(errno, absl::StrCat("chown to group ", *options_.group));
  }
  if (::chmod(options_.path.c_str(), options_.mode) != 0) return undo(errno, "chmod");
  struct stat st = {};
  if (::lstat(options_.path.c_str(), &st) != 0) return undo(errno, "lstat");
  socket_dev_ = st.st_dev;
  socket_ino_ = st.st_ino;
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) != 0) return undo(errno, "pipe2 for");
  wake_read_.reset(pipe_fds[0]);
  wake_write_.reset(pipe_fds[1]);
  if (::listen(listener_.get(), kBacklog) != 0) return undo(errno, "listen on");
  hand_off_ = std::move(hand_off);
  thread_ = std::thread(&PeerListener::Serve, this);
  return absl::OkStatus();
}

PeerListener::~PeerListener() { Stop(); }

void PeerListener::Stop() {
  if (stopped_.exchange(true)) return;
  if (wake_write_.valid()) {
    const char byte = 1;
    ssize_t n;
    do {
      n = ::write(wake_write_.get(), &byte, 1);
    } while (n < 0 && errno == EINTR);
  }
  if (thread_.joinable()) thread_.join();
  if (!listener_.valid()) return;  // never bound
  listener_.reset();
  struct stat st = {};
  if (::lstat(options_.path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) &&
      st.st_dev == socket_dev_ && st.st_ino == socket_ino_) {
    ::unlink(options_.path.c_str());
  }
}

bool PeerListener::WaitForStop(absl::Duration timeout) {
  pollfd pfd{wake_read_.get(), POLLIN, 0};
  const int rc = ::poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout)));
  return (rc > 0 && pfd.revents != 0) || stopped_.load();
}

void PeerListener::RateLimitedWarning(int kind, std::string_view msg, std::string detail) {
  WarningState& w = warnings_[kind];
  const absl::Time now = absl::Now();
  if (now - w.last < kWarningInterval) {
    ++w.suppressed;
    return;
  }
  Log(LogLevel::kWarning, msg,
      {{"detail", detail}, {"path", options_.path}, {"suppressed_since_last", w.suppressed}});
  w.last = now;
  w.suppressed = 0;
}

void PeerListener::Serve() {
  while (!stopped_.load()) {
    pollfd pfds[2] = {{listener_.get(), POLLIN, 0}, {wake_read_.get(), POLLIN, 0}};
    const int rc = ::poll(pfds, 2, -1);
    if (rc < 0) {
      if (errno == EINTR) continue;
      RateLimitedWarning(kAcceptFailed, "gRPC socket: poll failed", ErrnoText(errno));
      if (WaitForStop(kExhaustedBackoff)) return;
      continue;
    }
    if (pfds[1].revents != 0) return;
    if (!(pfds[0].revents & POLLIN)) continue;
    // Drain what is pending, so a burst of connections costs one poll.
    while (!stopped_.load()) {
      UniqueFd conn(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
      if (conn.valid()) {
        Admit(std::move(conn));
        continue;
      }
      const int err = errno;
      if (err == EAGAIN || err == EWOULDBLOCK) break;
      if (err == EINTR || err == ECONNABORTED) continue;
      // EMFILE, ENFILE, ENOBUFS, ENOMEM and anything unexpected: the connection stays queued,
      // so retrying at once would spin. Back off and try again; never give up.
      RateLimitedWarning(kAcceptFailed, "gRPC socket: accept failed; retrying", ErrnoText(err));
      if (WaitForStop(kExhaustedBackoff)) return;
      break;
    }
  }
}

void PeerListener::Admit(UniqueFd conn) {
  absl::StatusOr<PeerCredentials> peer = policy_->Check(conn.get());
  if (!peer.ok()) {
    RateLimitedWarning(kPeerDenied, "gRPC socket: connection refused", peer.status().ToString());
    return;  // closes the connection
  }
  struct stat st = {};
  if (::fstat(conn.get(), &st) != 0) {
    RateLimitedWarning(kAcceptFailed, "gRPC socket: fstat of a connection failed",
                       ErrnoText(errno));
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    const bool counted = peer->pid != ::getpid();
    if (counted && !WithinCapsLocked(*peer)) return;
    // A previous entry under this number belongs to a connection gRPC has closed (the kernel
    // reused the number): replace it.
    if (auto it = connections_.find(conn.get()); it != connections_.end()) {
      if (it->second.counted) {
        --counted_total_;
        --counted_per_uid_[it->second.peer.uid];
      }
      connections_.erase(it);
    }
    connections_[conn.get()] = Connection{*peer, st.st_dev, st.st_ino, counted};
    if (counted) {
      ++counted_total_;
      ++counted_per_uid_[peer->uid];
    }
  }
  hand_off_(conn.release());
}

bool PeerListener::WithinCapsLocked(const PeerCredentials& peer) {
  auto within = [&] {
    auto it = counted_per_uid_.find(peer.uid);
    const uint32_t of_uid = it == counted_per_uid_.end() ? 0 : it->second;
    return counted_total_ < options_.max_connections && of_uid < options_.max_connections_per_uid;
  };
  if (within()) return true;
  PruneLocked();
  if (within()) return true;
  RateLimitedWarning(
      kOverCap, "gRPC socket: connection refused, over the connection cap",
      absl::StrCat("uid ", peer.uid, " (pid ", peer.pid, "); open: ", counted_total_,
                   " in total (--max_connections=", options_.max_connections, "), ",
                   counted_per_uid_[peer.uid], " of this uid (--max_connections_per_uid=",
                   options_.max_connections_per_uid, ")"));
  return false;
}

void PeerListener::PruneLocked() {
  std::vector<int> closed;
  for (const auto& [fd, c] : connections_) {
    struct stat st = {};
    if (::fstat(fd, &st) != 0 || st.st_dev != c.dev || st.st_ino != c.ino) closed.push_back(fd);
  }
  for (int fd : closed) {
    auto it = connections_.find(fd);
    if (it->second.counted) {
      --counted_total_;
      if (--counted_per_uid_[it->second.peer.uid] == 0) counted_per_uid_.erase(it->second.peer.uid);
    }
    connections_.erase(it);
  }
}

size_t PeerListener::ShutdownConnections() {
  absl::MutexLock lock(&mu_);
  size_t shut = 0;
  for (const auto& [fd, c] : connections_) {
    struct stat st = {};
    if (::fstat(fd, &st) != 0 || st.st_dev != c.dev || st.st_ino != c.ino) continue;  // gone
    if (::shutdown(fd, SHUT_RDWR) == 0) ++shut;
  }
  return shut;
}

std::optional<PeerCredentials> PeerListener::Lookup(absl::string_view grpc_peer) const {
  constexpr absl::string_view kPrefix = "fd:";
  if (grpc_peer.substr(0, kPrefix.size()) != kPrefix) return std::nullopt;
  int fd = -1;
  if (!absl::SimpleAtoi(grpc_peer.substr(kPrefix.size()), &fd)) return std::nullopt;
  absl::MutexLock lock(&mu_);
  auto it = connections_.find(fd);
  if (it == connections_.end()) return std::nullopt;
  return it->second.peer;
}

uint64_t PeerListener::connections() const {
  absl::MutexLock lock(&mu_);
  return connections_.size();
}

}  // namespace cachemgr
