#include "cachemgr/util/fd_passing.h"

#include <errno.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace cachemgr {
namespace {

std::string ErrnoText(int err) { return absl::StrCat(std::strerror(err), " (errno ", err, ")"); }

// Errors that mean the other end of the connection is gone.
bool IsPeerGone(int err) {
  return err == EPIPE || err == ECONNRESET || err == ENOTCONN || err == ECONNREFUSED;
}

absl::StatusOr<sockaddr_un> MakeAddress(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  // sun_path needs room for the terminating NUL; an empty path would mean an autobind.
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("unix socket path \"", path, "\" is ",
                                                   path.size(), " bytes; must be 1..",
                                                   sizeof(addr.sun_path) - 1));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// Space for a full SCM_RIGHTS array plus the SCM_CREDENTIALS that SO_PASSCRED adds.
constexpr size_t kControlBytes =
    CMSG_SPACE(kMaxFdsPerMessage * sizeof(int)) + CMSG_SPACE(sizeof(ucred));

}  // namespace

absl::Status SendFdMessage(int socket_fd, std::string_view payload, absl::Span<const int> fds) {
  if (payload.size() > kMaxFdMessagePayload) {
    return absl::InvalidArgumentError(absl::StrCat("fd message payload of ", payload.size(),
                                                   " bytes exceeds ", kMaxFdMessagePayload));
  }
  if (fds.size() > kMaxFdsPerMessage) {
    return absl::InvalidArgumentError(absl::StrCat("fd message carries ", fds.size(),
                                                   " descriptors; at most ", kMaxFdsPerMessage));
  }
  for (int fd : fds) {
    if (fd < 0) return absl::InvalidArgumentError(absl::StrCat("invalid descriptor ", fd));
  }

  iovec iov{};
  iov.iov_base = const_cast<char*>(payload.data());
  iov.iov_len = payload.size();
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;

  std::vector<char> control;
  if (!fds.empty()) {
    const size_t fd_bytes = fds.size() * sizeof(int);
    // Zeroed so padding bytes in the cmsg buffer are deterministic.
    control.assign(CMSG_SPACE(fd_bytes), 0);
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(fd_bytes);
    std::memcpy(CMSG_DATA(cmsg), fds.data(), fd_bytes);
  }

  ssize_t sent;
  do {
    // MSG_NOSIGNAL: a vanished peer must surface as EPIPE, not kill the process with SIGPIPE.
    sent = ::sendmsg(socket_fd, &msg, MSG_NOSIGNAL);
  } while (sent < 0 && errno == EINTR);
  if (sent < 0) {
    const int err = errno;
    if (IsPeerGone(err)) {
      return absl::UnavailableError(absl::StrCat("sendmsg: peer is gone: ", ErrnoText(err)));
    }
    if (err == EAGAIN || err == EWOULDBLOCK) {
      return absl::DeadlineExceededError(
          absl::StrCat("sendmsg: send timed out or would block: ", ErrnoText(err)));
    }
    if (err == EMSGSIZE) {
      return absl::InvalidArgumentError(
          absl::StrCat("sendmsg: message too large for socket: ", ErrnoText(err)));
    }
    return absl::InternalError(absl::StrCat("sendmsg: ", ErrnoText(err)));
  }
  // SEQPACKET sends are atomic: a short count would mean a broken kernel contract.
  if (static_cast<size_t>(sent) != payload.size()) {
    return absl::InternalError(
        absl::StrCat("sendmsg sent ", sent, " of ", payload.size(), " bytes"));
  }
  return absl::OkStatus();
}

absl::StatusOr<FdMessage> ReceiveFdMessage(int socket_fd) {
  // On SEQPACKET a zero-length message and an orderly shutdown both read as 0 bytes. With
  // SO_PASSCRED every real message carries SCM_CREDENTIALS, so "0 bytes, no control data" is
  // unambiguously EOF. The option is restored afterwards so the caller's socket is unchanged
  // (it only matters at receive time; autobind on send happens only while it is set).
  int passcred = 0;
  socklen_t passcred_len = sizeof(passcred);
  if (::getsockopt(socket_fd, SOL_SOCKET, SO_PASSCRED, &passcred, &passcred_len) != 0) {
    const int err = errno;
    return absl::InternalError(absl::StrCat("getsockopt(SO_PASSCRED): ", ErrnoText(err)));
  }
  if (!passcred) {
    const int one = 1;
    if (::setsockopt(socket_fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) != 0) {
      const int err = errno;
      return absl::InternalError(absl::StrCat("setsockopt(SO_PASSCRED): ", ErrnoText(err)));
    }
  }

  FdMessage out;
  out.payload.resize(kMaxFdMessagePayload);
  alignas(cmsghdr) char control[kControlBytes];
  iovec iov{};
  iov.iov_base = out.payload.data();
  iov.iov_len = out.payload.size();
  msghdr msg{};
  ssize_t received;
  do {
    msg = msghdr{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    received = ::recvmsg(socket_fd, &msg, MSG_CMSG_CLOEXEC);
  } while (received < 0 && errno == EINTR);
  const int recv_errno = errno;

  if (!passcred) {
    const int zero = 0;
    (void)::setsockopt(socket_fd, SOL_SOCKET, SO_PASSCRED, &zero, sizeof(zero));
  }

  if (received < 0) {
    if (IsPeerGone(recv_errno)) {
      return absl::UnavailableError(absl::StrCat("recvmsg: peer is gone: ", ErrnoText(recv_errno)));
    }
    if (recv_errno == EAGAIN || recv_errno == EWOULDBLOCK) {
      return absl::DeadlineExceededError(
          absl::StrCat("recvmsg: receive timed out or would block: ", ErrnoText(recv_errno)));
    }
    return absl::InternalError(absl::StrCat("recvmsg: ", ErrnoText(recv_errno)));
  }

  // Take ownership of every descriptor first so that any error return below closes them.
  bool saw_credentials = false;
  for (cmsghdr* cmsg = CMSG_FIRSTHDR(&msg); cmsg != nullptr; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
    if (cmsg->cmsg_level != SOL_SOCKET) continue;
    if (cmsg->cmsg_type == SCM_CREDENTIALS) {
      saw_credentials = true;
    } else if (cmsg->cmsg_type == SCM_RIGHTS) {
      const size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const unsigned char* data = CMSG_DATA(cmsg);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, data + i * sizeof(int), sizeof(int));
        out.fds.emplace_back(fd);
      }
    }
  }

  if (received == 0 && !saw_credentials && out.fds.empty()) {
    return absl::UnavailableError("recvmsg: peer closed the connection");
  }
  if (msg.msg_flags & MSG_TRUNC) {
    return absl::DataLossError(absl::StrCat("recvmsg: message larger than ", kMaxFdMessagePayload,
                                            " bytes was truncated"));
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    return absl::DataLossError(absl::StrCat(
        "recvmsg: control data truncated; descriptors were lost (", out.fds.size(), " arrived)"));
  }
  out.payload.resize(static_cast<size_t>(received));
  out.payload.shrink_to_fit();
  return out;
}

absl::StatusOr<UniqueFd> ListenSeqpacket(const std::string& path, int backlog) {
  auto addr = MakeAddress(path);
  if (!addr.ok()) return addr.status();

  struct stat st = {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::FailedPreconditionError(
          absl::StrCat("\"", path, "\" exists and is not a socket; refusing to replace it"));
    }
    // A leftover socket from a previous run: bind() would fail with EADDRINUSE otherwise.
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      const int err = errno;
      return absl::InternalError(
          absl::StrCat("unlink stale socket \"", path, "\": ", ErrnoText(err)));
    }
  } else if (errno != ENOENT) {
    const int err = errno;
    return absl::InternalError(absl::StrCat("lstat \"", path, "\": ", ErrnoText(err)));
  }

  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd.valid()) {
    const int err = errno;
    return absl::InternalError(absl::StrCat("socket(AF_UNIX, SOCK_SEQPACKET): ", ErrnoText(err)));
  }
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(*addr)) != 0) {
    const int err = errno;
    const auto code = err == EACCES       ? absl::StatusCode::kPermissionDenied
                      : err == EADDRINUSE ? absl::StatusCode::kAlreadyExists
                                          : absl::StatusCode::kInternal;
    return absl::Status(code, absl::StrCat("bind \"", path, "\": ", ErrnoText(err)));
  }
  // Mode 0600 via chmod right after bind, not umask: umask is process-wide, so changing it
  // would race with files other threads create. fchmod on a socket fd does not reach the file
  // system node. The brief window with the default mode is harmless because connect() is
  // refused until listen(), which comes after the chmod.
  if (::chmod(path.c_str(), 0600) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return absl::InternalError(absl::StrCat("chmod 0600 \"", path, "\": ", ErrnoText(err)));
  }
  if (::listen(fd.get(), backlog) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return absl::InternalError(absl::StrCat("listen \"", path, "\": ", ErrnoText(err)));
  }
  return fd;
}

absl::StatusOr<UniqueFd> ConnectSeqpacket(const std::string& path) {
  auto addr = MakeAddress(path);
  if (!addr.ok()) return addr.status();
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd.valid()) {
    const int err = errno;
    return absl::InternalError(absl::StrCat("socket(AF_UNIX, SOCK_SEQPACKET): ", ErrnoText(err)));
  }
  int rc;
  do {
    rc = ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(*addr));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    const int err = errno;
    const std::string text = absl::StrCat("connect \"", path, "\": ", ErrnoText(err));
    if (err == ENOENT || err == ECONNREFUSED || err == EAGAIN) {
      return absl::UnavailableError(text);
    }
    if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(text);
    if (err == ENOTDIR || err == EPROTOTYPE) return absl::FailedPreconditionError(text);
    return absl::InternalError(text);
  }
  return fd;
}

}  // namespace cachemgr
