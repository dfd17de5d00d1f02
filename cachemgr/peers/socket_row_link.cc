#include "cachemgr/peers/socket_row_link.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cachemgr/util/secret_file.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr {
namespace {

constexpr char kKind[] = "socket";
constexpr size_t kNonceHexBytes = 32;
constexpr absl::Duration kNonceWait = absl::Seconds(1);
// How often a blocking call looks at its stop and the link's abort flag.
constexpr int kPollSliceMs = 5;

absl::Status ErrnoStatus(const char* what, int err) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(err)));
}

// Waits until `fd` is ready for `events`: OK, or DEADLINE_EXCEEDED / ABORTED. `aborted` (may
// be null) is the link's own flag.
absl::Status WaitReady(int fd, short events, const LinkWait& wait,
                       const std::atomic<bool>* aborted) {
  for (;;) {
    if (aborted != nullptr && aborted->load()) {
      return absl::AbortedError("the row link was aborted");
    }
    if (wait.Stopped()) return absl::AbortedError("the transfer stopped");
    const absl::Duration left = wait.deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError("the row link did not complete within the deadline");
    }
    pollfd p{fd, events, 0};
    const int slice =
        static_cast<int>(std::min<int64_t>(kPollSliceMs, absl::ToInt64Milliseconds(left) + 1));
    const int n = ::poll(&p, 1, slice);
    if (n < 0 && errno != EINTR) return ErrnoStatus("poll", errno);
    if (n > 0) return absl::OkStatus();  // ready, or an error the next call reports
  }
}

void TuneStream(int fd) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// Writes / reads exactly `bytes`.
absl::Status WriteAll(int fd, const std::byte* data, uint64_t bytes, const LinkWait& wait,
                      const std::atomic<bool>* aborted) {
  uint64_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::send(fd, data + done, bytes - done, MSG_NOSIGNAL);
    if (n > 0) {
      done += static_cast<uint64_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (absl::Status s = WaitReady(fd, POLLOUT, wait, aborted); !s.ok()) return s;
      continue;
    }
    return ErrnoStatus("the row link's peer went away (send)", n < 0 ? errno : EPIPE);
  }
  return absl::OkStatus();
}

absl::Status ReadAll(int fd, std::byte* data, uint64_t bytes, const LinkWait& wait,
                     const std::atomic<bool>* aborted) {
  uint64_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::recv(fd, data + done, bytes - done, 0);
    if (n > 0) {
      done += static_cast<uint64_t>(n);
      continue;
    }
    if (n == 0) {
      return absl::UnavailableError(
          absl::StrCat("the row link's peer closed it after ", done, " of ", bytes, " bytes"));
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (absl::Status s = WaitReady(fd, POLLIN, wait, aborted); !s.ok()) return s;
      continue;
    }
    return ErrnoStatus("the row link's peer went away (recv)", errno);
  }
  return absl::OkStatus();
}

class HostBuffer final : public LinkBuffer {
 public:
  explicit HostBuffer(uint64_t bytes) : bytes_(bytes) {}
  std::byte* data() override { return bytes_.data(); }
  uint64_t size() const override { return bytes_.size(); }

 private:
  std::vector<std::byte> bytes_;
};

class SocketRowLink final : public RowLink {
 public:
  explicit SocketRowLink(UniqueFd fd) : fd_(std::move(fd)) {}

  int device() const override { return -1; }
  absl::StatusOr<std::unique_ptr<LinkBuffer>> NewBuffer(uint64_t bytes) override {
    return std::make_unique<HostBuffer>(bytes);
  }
  absl::Status Send(const std::byte* data, uint64_t bytes, const LinkWait& wait) override {
    return Breaking(WriteAll(fd_.get(), data, bytes, wait, &aborted_));
  }
  absl::Status Recv(std::byte* data, uint64_t bytes, const LinkWait& wait) override {
    return Breaking(ReadAll(fd_.get(), data, bytes, wait, &aborted_));
  }
  bool broken() const override { return broken_.load() || aborted_.load(); }
  void Abort() override {
    aborted_.store(true);
    ::shutdown(fd_.get(), SHUT_RDWR);  // the peer sees the link close at once
  }

 private:
  // A failure breaks the link; after Abort every failure says so (the shutdown Abort did is
  // what the call saw).
  absl::Status Breaking(absl::Status s) {
    if (!s.ok()) {
      broken_.store(true);
      ::shutdown(fd_.get(), SHUT_RDWR);
      if (aborted_.load()) return absl::AbortedError("the row link was aborted");
    }
    return s;
  }

  UniqueFd fd_;
  std::atomic<bool> aborted_{false};
  std::atomic<bool> broken_{false};
};

class PendingSocketLink final : public PendingRowLink {
 public:
  PendingSocketLink(UniqueFd listener, std::string offer, std::string nonce)
      : listener_(std::move(listener)), offer_(std::move(offer)), nonce_(std::move(nonce)) {}

  const std::string& offer() const override { return offer_; }

  absl::StatusOr<std::unique_ptr<RowLink>> Complete(const LinkWait& wait) override {
    for (;;) {
      if (absl::Status s = WaitReady(listener_.get(), POLLIN, wait, nullptr); !s.ok()) return s;
      UniqueFd conn(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
      if (!conn.valid()) {
        if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) continue;
        return ErrnoStatus("accept", errno);
      }
      // Whoever connects must present the nonce within a second (and the wait); a stranger is
      // closed and the wait goes on, so one that connects and stays silent holds it up no more.
      std::string presented(kNonceHexBytes, '\0');
      const LinkWait nonce_wait{std::min(wait.deadline, absl::Now() + kNonceWait), wait.stop};
      if (!ReadAll(conn.get(), reinterpret_cast<std::byte*>(presented.data()), presented.size(),
                   nonce_wait, nullptr)
               .ok() ||
          !ConstantTimeEquals(presented, nonce_)) {
        if (wait.Stopped()) return absl::AbortedError("the transfer stopped");
        if (absl::Now() >= wait.deadline) {
          return absl::DeadlineExceededError("no peer joined the row link within the deadline");
        }
        continue;
      }
      TuneStream(conn.get());
      return std::make_unique<SocketRowLink>(std::move(conn));
    }
  }

 private:
  UniqueFd listener_;
  const std::string offer_;
  const std::string nonce_;
};

// An offer's "HOST PORT NONCE".
absl::StatusOr<std::vector<std::string>> Parse(std::string_view offer) {
  std::vector<std::string> parts =
      absl::StrSplit(absl::string_view(offer.data(), offer.size()), ' ');
  int port = 0;
  if (parts.size() != 3 || parts[0].empty() || !absl::SimpleAtoi(parts[1], &port) || port <= 0 ||
      port > 65535 || parts[2].size() != kNonceHexBytes) {
    return absl::InvalidArgumentError(
        "header.row_link.offer is not a socket link's \"HOST PORT NONCE\"");
  }
  return parts;
}

class SocketRowLinkKind final : public RowLinkKind {
 public:
  explicit SocketRowLinkKind(std::string host) : host_(std::move(host)) {}

  std::string_view name() const override { return kKind; }
  bool Serves(int) const override { return true; }

  absl::StatusOr<std::unique_ptr<PendingRowLink>> Offer(int) override {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    addrinfo* found = nullptr;
    if (const int rc = ::getaddrinfo(host_.c_str(), "0", &hints, &found); rc != 0) {
      return absl::UnavailableError(
          absl::StrCat("--row_link_host ", host_, " does not resolve: ", gai_strerror(rc)));
    }
    absl::Status last = absl::UnavailableError(absl::StrCat("no address of ", host_));
    for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
      UniqueFd fd(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
      if (!fd.valid() || ::bind(fd.get(), a->ai_addr, a->ai_addrlen) != 0 ||
          ::listen(fd.get(), 4) != 0) {
        last = ErrnoStatus(absl::StrCat("listening on ", host_).c_str(), errno);
        continue;
      }
      sockaddr_storage bound{};
      socklen_t len = sizeof(bound);
      if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &len) != 0) {
        last = ErrnoStatus("getsockname", errno);
        continue;
      }
      const int port =
          ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
      ::freeaddrinfo(found);
      std::string nonce = RandomHex(kNonceHexBytes / 2);
      std::string offer = absl::StrCat(host_, " ", port, " ", nonce);
      return std::make_unique<PendingSocketLink>(std::move(fd), std::move(offer), std::move(nonce));
    }
    ::freeaddrinfo(found);
    return last;
  }

  absl::Status CanJoin(std::string_view offer, int) const override { return Parse(offer).status(); }

  absl::StatusOr<std::unique_ptr<RowLink>> Join(std::string_view offer, int,
                                                const LinkWait& wait) override {
    absl::StatusOr<std::vector<std::string>> parsed = Parse(offer);
    if (!parsed.ok()) return parsed.status();
    const std::vector<std::string>& parts = *parsed;
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    if (const int rc = ::getaddrinfo(parts[0].c_str(), parts[1].c_str(), &hints, &found); rc != 0) {
      return absl::UnavailableError(
          absl::StrCat("the row link's host ", parts[0], " does not resolve: ", gai_strerror(rc)));
    }
    absl::Status last = absl::UnavailableError(absl::StrCat("no address of ", parts[0]));
    for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
      UniqueFd fd(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
      if (!fd.valid()) {
        last = ErrnoStatus("socket", errno);
        continue;
      }
      if (::connect(fd.get(), a->ai_addr, a->ai_addrlen) != 0) {
        if (errno != EINPROGRESS) {
          last = ErrnoStatus(
              absl::StrCat("connecting to the row link at ", parts[0], " port ", parts[1]).c_str(),
              errno);
          continue;
        }
        if (absl::Status s = WaitReady(fd.get(), POLLOUT, wait, nullptr); !s.ok()) {
          ::freeaddrinfo(found);
          return s;
        }
        int err = 0;
        socklen_t len = sizeof(err);
        ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) {
          last = ErrnoStatus(
              absl::StrCat("connecting to the row link at ", parts[0], " port ", parts[1]).c_str(),
              err);
          continue;
        }
      }
      ::freeaddrinfo(found);
      if (absl::Status s = WriteAll(fd.get(), reinterpret_cast<const std::byte*>(parts[2].data()),
                                    parts[2].size(), wait, nullptr);
          !s.ok()) {
        return s;
      }
      TuneStream(fd.get());
      return std::make_unique<SocketRowLink>(std::move(fd));
    }
    ::freeaddrinfo(found);
    return last;
  }

 private:
  const std::string host_;
};

}  // namespace

std::unique_ptr<RowLinkKind> NewSocketRowLinkKind(std::string host) {
  return std::make_unique<SocketRowLinkKind>(std::move(host));
}

}  // namespace cachemgr
