#include "client/src/fast_path_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace cachemgr::client {
namespace {

// Waits until `fd` is ready for `events` or `deadline` passes; false on timeout.
absl::StatusOr<bool> WaitReady(int fd, short events, absl::Time deadline) {
  for (;;) {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return false;
    pollfd p{fd, events, 0};
    const int ms = static_cast<int>(
        std::min<int64_t>(absl::ToInt64Milliseconds(left) + 1, std::numeric_limits<int>::max()));
    const int n = poll(&p, 1, ms);
    if (n > 0) return true;
    if (n < 0 && errno != EINTR) {
      return absl::UnavailableError(absl::StrCat("poll: ", std::strerror(errno)));
    }
  }
}

}  // namespace

bool FastPathClient::Connect() {
  {
    absl::MutexLock lock(&fd_mu_);
    if (fd_.valid()) {
      // An idle connection has nothing to read: readable means the daemon closed it.
      pollfd p{fd_.get(), POLLIN, 0};
      if (poll(&p, 1, 0) == 0) return true;
      fd_.reset();
    }
  }
  if (absl::Now() < retry_at_) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid() || path_.size() >= sizeof(addr.sun_path)) {
    retry_at_ = absl::Now() + absl::Seconds(1);
    return false;
  }
  std::memcpy(addr.sun_path, path_.data(), path_.size());
  int rc;
  do {
    rc = connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0 || fcntl(fd.get(), F_SETFL, O_NONBLOCK) != 0) {
    retry_at_ = absl::Now() + absl::Seconds(1);
    return false;
  }
  absl::MutexLock lock(&fd_mu_);
  fd_ = std::move(fd);
  return true;
}

void FastPathClient::Drop() {
  absl::MutexLock lock(&fd_mu_);
  fd_.reset();
}

void FastPathClient::Interrupt() {
  absl::MutexLock lock(&fd_mu_);
  if (fd_.valid()) shutdown(fd_.get(), SHUT_RDWR);
}

std::optional<absl::Status> FastPathClient::Call(FastMethod method,
                                                 const google::protobuf::Message& request,
                                                 google::protobuf::Message* response,
                                                 absl::Duration timeout) {
  if (!call_mu_.TryLock()) return std::nullopt;
  std::optional<absl::Status> status = CallLocked(method, request, response, timeout);
  call_mu_.Unlock();
  return status;
}

std::optional<absl::Status> FastPathClient::CallLocked(FastMethod method,
                                                       const google::protobuf::Message& request,
                                                       google::protobuf::Message* response,
                                                       absl::Duration timeout) {
  if (!Connect()) return std::nullopt;
  int fd;
  {
    absl::MutexLock lock(&fd_mu_);
    fd = fd_.get();  // stays open: only this thread (holding call_mu_) closes it
  }
  const absl::Time deadline = absl::Now() + timeout;
  const size_t body = 1 + request.ByteSizeLong();
  if (body > kMaxFastRequestBytes) return std::nullopt;  // gRPC takes it (and answers its size)
  frame_.clear();
  AppendFastFrameHeader(static_cast<uint32_t>(body), &frame_);
  frame_.push_back(static_cast<char>(method));
  request.AppendToString(&frame_);
  auto broken = [&](absl::string_view what) {
    Drop();
    return absl::UnavailableError(
        absl::StrCat("fast path connection to ", path_, " failed: ", what));
  };
  // Sleeps until the socket is ready for `events`; the call's error when it cannot be.
  auto wait = [&](short events) -> absl::Status {
    absl::StatusOr<bool> ready = WaitReady(fd, events, deadline);
    if (!ready.ok()) return broken(ready.status().message());
    if (*ready) return absl::OkStatus();
    Drop();  // a late reply must not be read as the next call's
    return absl::DeadlineExceededError("Deadline Exceeded");
  };
  // Send.
  for (size_t sent = 0; sent < frame_.size();) {
    const ssize_t n = send(fd, frame_.data() + sent, frame_.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (absl::Status waited = wait(POLLOUT); !waited.ok()) return waited;
      continue;
    }
    return broken(std::strerror(errno));
  }
  // Receive one reply frame, polling without sleeping during the spin.
  const absl::Time spin_until = absl::Now() + spin_;
  FastFrameReader reader(std::numeric_limits<uint32_t>::max());  // the daemon bounds replies
  char chunk[16 << 10];
  std::string_view reply;
  for (;;) {
    absl::StatusOr<std::optional<std::string_view>> next = reader.Next();
    if (!next.ok()) return broken(next.status().message());
    if (next->has_value()) {
      reply = **next;
      break;
    }
    const ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
    if (n > 0) {
      reader.Append(std::string_view(chunk, static_cast<size_t>(n)));
      continue;
    }
    if (n == 0) return broken("the daemon closed the connection");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (absl::Now() < spin_until) continue;
      if (absl::Status waited = wait(POLLIN); !waited.ok()) return waited;
      continue;
    }
    return broken(std::strerror(errno));
  }
  if (reader.buffered() != 0) return broken("the daemon sent more than one reply");
  calls_.fetch_add(1, std::memory_order_relaxed);
  const auto code = static_cast<absl::StatusCode>(static_cast<unsigned char>(reply[0]));
  const char* payload = reply.data() + 1;
  const size_t payload_bytes = reply.size() - 1;
  if (code != absl::StatusCode::kOk) {
    return absl::Status(code, absl::string_view(payload, payload_bytes));
  }
  if (!response->ParseFromArray(payload, static_cast<int>(payload_bytes))) {
    return broken("the reply does not parse");
  }
  return absl::OkStatus();
}

}  // namespace cachemgr::client
