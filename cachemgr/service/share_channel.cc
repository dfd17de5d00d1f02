#include "cachemgr/service/share_channel.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string_view>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "cachemgr/service/peer_policy.h"
#include "cachemgr/util/fd_passing.h"
#include "cachemgr/util/log.h"

namespace cachemgr {
namespace {

// absl::string_view throughout: Debian's abseil has its own type, distinct from
// std::string_view, and StrCat / Status only take the former.

constexpr absl::string_view kSharePrefix = "SHARE ";
constexpr absl::string_view kOkPrefix = "OK ";
constexpr absl::string_view kErrPrefix = "ERR ";

std::string ErrnoText(int err) { return absl::StrCat(std::strerror(err), " (errno ", err, ")"); }

absl::Status SetTimeouts(int fd, absl::Duration timeout) {
  const timeval tv = absl::ToTimeval(timeout);
  if (::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0 ||
      ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0) {
    const int err = errno;
    return absl::InternalError(
        absl::StrCat("setsockopt(SO_RCVTIMEO/SO_SNDTIMEO): ", ErrnoText(err)));
  }
  return absl::OkStatus();
}

std::string ErrorReply(const absl::Status& status) {
  return absl::StrCat(kErrPrefix, absl::StatusCodeToString(status.code()), " ", status.message());
}

// Tokens are opaque but printable and space-free, which keeps the one-line protocol unambiguous.
bool IsValidToken(absl::string_view token) {
  if (token.empty()) return false;
  for (char c : token) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u == 0x7f) return false;
  }
  return true;
}

bool ParseStatusCode(absl::string_view name, absl::StatusCode* code) {
  // absl status codes are the dense range OK(0)..UNAUTHENTICATED(16).
  for (int i = 0; i <= static_cast<int>(absl::StatusCode::kUnauthenticated); ++i) {
    const auto candidate = static_cast<absl::StatusCode>(i);
    if (absl::StatusCodeToString(candidate) == name) {
      *code = candidate;
      return true;
    }
  }
  return false;
}

// The poll() timeout that wakes at `deadline` (rounded up to a millisecond so the loop does not
// spin on a sub-millisecond remainder); -1 for no deadline.
int PollTimeoutMs(absl::Time now, absl::Time deadline) {
  if (deadline == absl::InfiniteFuture()) return -1;
  if (deadline <= now) return 0;
  return static_cast<int>(std::min<int64_t>(
      absl::ToInt64Milliseconds(absl::Ceil(deadline - now, absl::Milliseconds(1))),
      std::numeric_limits<int>::max()));
}

}  // namespace

ShareChannelServer::ShareChannelServer(std::string path, UniqueFd listener,
                                       const PeerPolicy* policy, Resolver resolver,
                                       ShareChannelLimits limits)
    : path_(std::move(path)),
      listener_(std::move(listener)),
      policy_(policy),
      resolver_(std::move(resolver)),
      limits_(limits) {}

absl::StatusOr<std::unique_ptr<ShareChannelServer>> ShareChannelServer::Start(
    const std::string& path, const PeerPolicy* policy, Resolver resolver,
    ShareChannelLimits limits) {
  if (!resolver) return absl::InvalidArgumentError("share channel needs a resolver");
  if (policy == nullptr) return absl::InvalidArgumentError("share channel needs a peer policy");
  if (limits.request_timeout <= absl::ZeroDuration() || limits.max_connections == 0) {
    return absl::InvalidArgumentError(
        "share channel limits: request_timeout and max_connections must be positive");
  }
  auto listener = ListenSeqpacket(path);
  if (!listener.ok()) return listener.status();
  // Non-blocking so a client that vanishes between poll() and accept4() cannot block the loop.
  if (::fcntl(listener->get(), F_SETFL, O_NONBLOCK) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return absl::InternalError(absl::StrCat("fcntl(O_NONBLOCK) on listener: ", ErrnoText(err)));
  }
  struct stat st = {};
  if (::lstat(path.c_str(), &st) != 0) {
    const int err = errno;
    return absl::InternalError(absl::StrCat("lstat \"", path, "\": ", ErrnoText(err)));
  }
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return absl::InternalError(absl::StrCat("pipe2: ", ErrnoText(err)));
  }
  std::unique_ptr<ShareChannelServer> server(
      new ShareChannelServer(path, std::move(*listener), policy, std::move(resolver), limits));
  server->wake_read_.reset(pipe_fds[0]);
  server->wake_write_.reset(pipe_fds[1]);
  server->socket_dev_ = st.st_dev;
  server->socket_ino_ = st.st_ino;
  server->thread_ = std::thread(&ShareChannelServer::Serve, server.get());
  return server;
}

ShareChannelServer::~ShareChannelServer() { Stop(); }

void ShareChannelServer::Stop() {
  if (stopped_.exchange(true)) return;
  if (wake_write_.valid()) {
    const char byte = 1;
    ssize_t n;
    do {
      n = ::write(wake_write_.get(), &byte, 1);
    } while (n < 0 && errno == EINTR);
  }
  if (thread_.joinable()) thread_.join();
  listener_.reset();
  // Only remove the file if it is still ours: a successor may already have replaced it.
  struct stat st = {};
  if (::lstat(path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) &&
      static_cast<uint64_t>(st.st_dev) == socket_dev_ &&
      static_cast<uint64_t>(st.st_ino) == socket_ino_) {
    ::unlink(path_.c_str());
  }
}

void ShareChannelServer::SendReply(int conn, std::string_view payload, absl::Span<const int> fds) {
  // Never blocks: the connection is non-blocking, and the peer's receive queue holds at most
  // this one message from us.
  absl::Status sent = SendFdMessage(conn, payload, fds);
  if (!sent.ok()) undelivered_.Record(absl::Now(), {"error", sent.ToString()});
}

bool ShareChannelServer::WaitForStop(absl::Duration timeout) {
  pollfd pfd{wake_read_.get(), POLLIN, 0};
  const int rc = ::poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout)));
  return (rc > 0 && pfd.revents != 0) || stopped_.load();
}

void ShareChannelServer::Serve() {
  // However the loop ends, no connection is left waiting for an answer that will not come.
  absl::Cleanup close_all = [this] { waiting_.clear(); };
  std::vector<pollfd> pfds;
  while (!stopped_.load()) {
    absl::Time now = absl::Now();
    // Connections past their deadline are told why and closed (oldest first, so the expired
    // ones are at the front).
    while (!waiting_.empty() && waiting_.front().deadline <= now) {
      SendReply(waiting_.front().conn.get(),
                ErrorReply(absl::DeadlineExceededError(absl::StrCat(
                    "no request within ", absl::FormatDuration(limits_.request_timeout)))),
                {});
      waiting_.pop_front();
    }

    const bool accepting = now >= accept_paused_until_;
    pfds.clear();
    pfds.push_back({wake_read_.get(), POLLIN, 0});
    // A paused listener is left out (fd -1 is ignored by poll) so it cannot spin the loop.
    pfds.push_back({accepting ? listener_.get() : -1, POLLIN, 0});
    for (const Waiting& w : waiting_) pfds.push_back({w.conn.get(), POLLIN, 0});
    absl::Time wake_at = waiting_.empty() ? absl::InfiniteFuture() : waiting_.front().deadline;
    if (!accepting) wake_at = std::min(wake_at, accept_paused_until_);

    const int rc = ::poll(pfds.data(), pfds.size(), PollTimeoutMs(now, wake_at));
    if (rc < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      Log(LogLevel::kError, "share channel: poll failed", {{"error", ErrnoText(err)}});
      if (WaitForStop(absl::Milliseconds(100))) return;
      continue;
    }
    if (pfds[0].revents != 0) return;

    // Requests first: they may free slots the new connections need. pfds[2 + i] is
    // waiting_[i]; the answered ones are removed after the pass.
    std::vector<bool> done(waiting_.size(), false);
    bool any_done = false;
    for (size_t i = 0; i < waiting_.size(); ++i) {
      if (pfds[2 + i].revents == 0) continue;
      done[i] = TryServe(waiting_[i].conn.get());
      any_done |= done[i];
    }
    if (any_done) {
      std::deque<Waiting> still;
      for (size_t i = 0; i < waiting_.size(); ++i) {
        if (!done[i]) still.push_back(std::move(waiting_[i]));
      }
      waiting_.swap(still);
    }

    if (pfds[1].revents & (POLLERR | POLLNVAL)) {
      Log(LogLevel::kError, "share channel: listener failed; no longer serving", {{"path", path_}});
      return;
    }
    if (pfds[1].revents & POLLIN) {
      if (!AcceptPending(absl::Now())) return;
    }
  }
}

bool ShareChannelServer::AcceptPending(absl::Time now) {
  // Bounded so a connect flood cannot keep the loop from the connections it already holds.
  for (size_t accepted = 0; accepted < limits_.max_connections; ++accepted) {
    UniqueFd conn(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!conn.valid()) {
      const int err = errno;
      if (err == EAGAIN || err == EWOULDBLOCK) return true;
      if (err == EINTR || err == ECONNABORTED) continue;
      if (err == EBADF || err == EINVAL || err == ENOTSOCK) {
        Log(LogLevel::kError, "share channel: listener failed; no longer serving",
            {{"path", path_}, {"error", ErrnoText(err)}});
        return false;
      }
      // E.g. EMFILE: the pending connection stays queued and the listener stays readable, so
      // stop watching it for a while instead of spinning; the open connections are served on.
      accept_failures_.Record(now, {"error", ErrnoText(err)});
      accept_paused_until_ = now + kShareAcceptBackoff;
      return true;
    }
    // A client normally sends its request right after connecting: answer it now, without
    // taking a slot a flood of idle peers could contend for.
    if (TryServe(conn.get())) continue;
    if (waiting_.size() >= limits_.max_connections) {
      DropOldest(absl::ResourceExhaustedError(
          absl::StrCat("share channel is at its limit of ", limits_.max_connections,
                       " waiting connections; this one waited longest")));
      evictions_.Record(now, {"max_connections", static_cast<uint64_t>(limits_.max_connections)});
    }
    waiting_.push_back({std::move(conn), now + limits_.request_timeout});
  }
  return true;
}

void ShareChannelServer::DropOldest(const absl::Status& reply) {
  if (waiting_.empty()) return;
  SendReply(waiting_.front().conn.get(), ErrorReply(reply), {});
  waiting_.pop_front();
}

bool ShareChannelServer::TryServe(int conn) {
  absl::StatusOr<FdMessage> request = ReceiveFdMessage(conn);
  if (request.ok()) {
    HandleRequest(conn, *std::move(request));
    return true;
  }
  // On a non-blocking socket DEADLINE_EXCEEDED means nothing has arrived yet.
  if (absl::IsDeadlineExceeded(request.status())) return false;
  if (absl::IsDataLoss(request.status())) {
    SendReply(conn, ErrorReply(absl::InvalidArgumentError("request too large")), {});
  }
  Log(LogLevel::kDebug, "share channel: no request received",
      {{"error", request.status().ToString()}});
  return true;
}

void ShareChannelServer::HandleRequest(int conn, FdMessage request) {
  // Who is asking comes after reading the request on purpose: closing with unread data makes
  // the peer's recvmsg fail with ECONNRESET before it sees the queued reply.
  // The socket's mode already keeps other users out; the policy check also covers a socket
  // whose mode was loosened or a descriptor to it that leaked into another user's process.
  absl::StatusOr<PeerCredentials> peer = policy_->Check(conn);
  if (!peer.ok()) {
    rejected_peers_.Record(absl::Now(), {"error", peer.status().ToString()});
    SendReply(conn, ErrorReply(peer.status()), {});
    return;
  }

  // What is asked.
  if (!request.fds.empty()) {
    // The descriptors are closed when `request` goes out of scope.
    SendReply(conn,
              ErrorReply(absl::InvalidArgumentError("a SHARE request must not carry descriptors")),
              {});
    return;
  }
  absl::string_view payload = request.payload;
  if (payload.substr(0, kSharePrefix.size()) != kSharePrefix ||
      !IsValidToken(payload.substr(kSharePrefix.size()))) {
    SendReply(conn,
              ErrorReply(absl::InvalidArgumentError(
                  "malformed request; expected \"SHARE <session_token>\"")),
              {});
    return;
  }
  const std::string token(payload.substr(kSharePrefix.size()));

  // The answer.
  absl::StatusOr<std::vector<int>> fds = resolver_(token, *peer);
  if (!fds.ok()) {
    SendReply(conn, ErrorReply(fds.status()), {});
    return;
  }
  if (fds->size() > kMaxFdsPerMessage) {
    Log(LogLevel::kError, "share channel: resolver returned too many descriptors",
        {{"count", static_cast<uint64_t>(fds->size())}});
    SendReply(
        conn,
        ErrorReply(absl::InternalError(absl::StrCat(
            "daemon has ", fds->size(), " regions; at most ", kMaxFdsPerMessage, " can be sent"))),
        {});
    return;
  }
  SendReply(conn, absl::StrCat(kOkPrefix, fds->size()), *fds);
}

absl::StatusOr<std::vector<UniqueFd>> FetchSharedFds(const std::string& path,
                                                     const std::string& session_token) {
  auto conn = ConnectSeqpacket(path);
  if (!conn.ok()) return conn.status();
  if (absl::Status s = SetTimeouts(conn->get(), kShareFetchTimeout); !s.ok()) return s;
  if (absl::Status s = SendFdMessage(conn->get(), absl::StrCat(kSharePrefix, session_token), {});
      !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("share channel \"", path, "\": ", s.message()));
  }
  auto reply = ReceiveFdMessage(conn->get());
  if (!reply.ok()) {
    const absl::Status& s = reply.status();
    return absl::Status(s.code(),
                        absl::StrCat("share channel \"", path, "\": no reply: ", s.message()));
  }

  absl::string_view payload = reply->payload;
  if (payload.substr(0, kOkPrefix.size()) == kOkPrefix) {
    size_t expected = 0;
    absl::string_view count = payload.substr(kOkPrefix.size());
    // SimpleAtoi tolerates surrounding whitespace; the protocol does not.
    if (count.empty() || count.find_first_not_of("0123456789") != absl::string_view::npos ||
        !absl::SimpleAtoi(count, &expected)) {
      return absl::InternalError(
          absl::StrCat("share channel: malformed reply \"", payload.substr(0, 64), "\""));
    }
    if (reply->fds.size() != expected) {
      return absl::DataLossError(absl::StrCat("share channel: daemon announced ", expected,
                                              " descriptors but ", reply->fds.size(), " arrived"));
    }
    return std::move(reply->fds);
  }
  if (payload.substr(0, kErrPrefix.size()) == kErrPrefix) {
    absl::string_view rest = payload.substr(kErrPrefix.size());
    const size_t space = rest.find(' ');
    absl::string_view code_name = rest.substr(0, space);
    absl::string_view message = space == absl::string_view::npos ? "" : rest.substr(space + 1);
    absl::StatusCode code;
    if (!ParseStatusCode(code_name, &code) || code == absl::StatusCode::kOk) {
      return absl::UnknownError(absl::StrCat("share channel: daemon error: ", rest));
    }
    return absl::Status(code, message);
  }
  return absl::InternalError(
      absl::StrCat("share channel: malformed reply \"", payload.substr(0, 64), "\""));
}

}  // namespace cachemgr
