#include "tests/support/http_client.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace cachemgr::testing {

absl::StatusOr<UniqueFd> ConnectLoopback(int port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  const timeval tv = {20, 0};
  if (::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0) {
    return absl::InternalError(absl::StrCat("SO_RCVTIMEO: ", std::strerror(errno)));
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    const std::string text = absl::StrCat("connect 127.0.0.1:", port, ": ", std::strerror(err));
    return err == ECONNREFUSED ? absl::UnavailableError(text) : absl::InternalError(text);
  }
  return fd;
}

absl::StatusOr<std::string> HttpRequest(int port, const std::string& method,
                                        const std::string& path) {
  absl::StatusOr<UniqueFd> conn = ConnectLoopback(port);
  if (!conn.ok()) return conn.status();
  const std::string request = absl::StrCat(method, " ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n",
                                           method == "GET" ? "" : "Content-Length: 0\r\n", "\r\n");
  if (::send(conn->get(), request.data(), request.size(), MSG_NOSIGNAL) !=
      static_cast<ssize_t>(request.size())) {
    return absl::InternalError(absl::StrCat("send: ", std::strerror(errno)));
  }
  std::string response;
  char buf[16384];
  for (;;) {
    const ssize_t n = ::recv(conn->get(), buf, sizeof(buf), 0);
    if (n == 0) return response;
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::DeadlineExceededError(
          absl::StrCat("recv after ", response.size(), " bytes: ", std::strerror(errno)));
    }
    response.append(buf, static_cast<size_t>(n));
  }
}

}  // namespace cachemgr::testing
