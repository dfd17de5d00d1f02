// The fast path's server (cachemgr/service/fast_path_server.h) on the fuzz harness's daemon
// state (service_harness.h): whatever bytes arrive on a connection, the daemon answers with
// well-formed replies, one per complete request in order (or an error, then the close, for a
// frame it cannot take), and its books stay sane.
//
// Input: with a first byte 0xff, the rest is the byte stream as sent. Otherwise a series of
// requests, each [method byte][2-byte little-endian length][payload]: a payload that parses as
// the method's request gets the fixture's real token for a token "0" or "1" (as the rpc_*
// targets do), so the calls reach the fixture's sequences.
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "cachemgr/service/fast_path_server.h"
#include "cachemgr/util/fast_path_wire.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/service_harness.h"

namespace cachemgr::fuzz {
namespace {

// A request's payload with the fixture's token when it names "0" or "1".
template <typename Request>
std::string WithToken(const std::string& payload) {
  Request request;
  if (!request.ParseFromString(payload)) return payload;
  request.set_session_token(ServiceHarness::Get().ResolveToken(request.session_token()));
  return request.SerializeAsString();
}

std::string Resolved(uint8_t method, const std::string& payload) {
  switch (static_cast<FastMethod>(method)) {
    case FastMethod::kHeartbeat:
      return WithToken<v1::HeartbeatRequest>(payload);
    case FastMethod::kAllocate:
      return WithToken<v1::AllocateRequest>(payload);
    case FastMethod::kFree:
      return WithToken<v1::FreeRequest>(payload);
    case FastMethod::kFork:
      return WithToken<v1::ForkRequest>(payload);
    case FastMethod::kStep:
      return WithToken<v1::StepRequest>(payload);
  }
  return payload;
}

// The stream to send, and how many requests it frames completely (-1: raw bytes, unknown).
std::string Stream(const uint8_t* data, size_t size, int* requests) {
  if (size > 0 && data[0] == 0xff) {
    *requests = -1;
    return std::string(reinterpret_cast<const char*>(data) + 1, size - 1);
  }
  std::string out;
  *requests = 0;
  size_t at = 0;
  while (at + 3 <= size) {
    const uint8_t method = data[at];
    const size_t length = std::min<size_t>(data[at + 1] | size_t{data[at + 2]} << 8, size - at - 3);
    const std::string payload =
        Resolved(method, std::string(reinterpret_cast<const char*>(data) + at + 3, length));
    AppendFastFrameHeader(static_cast<uint32_t>(payload.size() + 1), &out);
    out.push_back(static_cast<char>(method));
    out += payload;
    ++*requests;
    at += 3 + length;
  }
  return out;
}

FastPathServer& Server() {
  static FastPathServer* server = [] {
    absl::StatusOr<std::unique_ptr<FastPathServer>> s = FastPathServer::Start(
        &ServiceHarness::Get().manager(), /*metrics=*/nullptr, absl::ZeroDuration());
    if (!s.ok()) Fail(s.status().ToString());
    return s->release();  // never destroyed, as the harness
  }();
  return *server;
}

}  // namespace
}  // namespace cachemgr::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cachemgr;
  using namespace cachemgr::fuzz;
  ServiceHarness& h = ServiceHarness::Get();
  h.Reset();
  int requests = 0;
  const std::string stream = Stream(data, size, &requests);
  int fds[2];
  Check(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0, "socketpair");
  UniqueFd mine(fds[0]), theirs(fds[1]);
  Check(fcntl(theirs.get(), F_SETFL, O_NONBLOCK) == 0, "fcntl");
  Server().Adopt(std::move(theirs), std::nullopt);
  // Send everything, then half-close; read replies meanwhile so neither side's buffer fills.
  timeval tv{30, 0};
  setsockopt(mine.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  std::string received;
  size_t sent = 0;
  char buffer[65536];
  while (sent < stream.size()) {
    const ssize_t n =
        send(mine.get(), stream.data() + sent, stream.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) sent += static_cast<size_t>(n);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) break;  // the daemon closed it
    const ssize_t got = recv(mine.get(), buffer, sizeof(buffer), MSG_DONTWAIT);
    if (got > 0) received.append(buffer, static_cast<size_t>(got));
  }
  shutdown(mine.get(), SHUT_WR);
  for (;;) {
    const ssize_t got = recv(mine.get(), buffer, sizeof(buffer), 0);
    if (got == 0) break;
    Check(got > 0, "no close from the fast path within 30 s");
    received.append(buffer, static_cast<size_t>(got));
  }
  // Well-formed replies: a status byte each, then an error message or a response.
  FastFrameReader reader(UINT32_MAX);
  reader.Append(received);
  int replies = 0;
  for (;;) {
    absl::StatusOr<std::optional<std::string_view>> body = reader.Next();
    Check(body.ok(), "a reply frame the client cannot read");
    if (!body->has_value()) break;
    const std::string_view reply = **body;
    const int code = static_cast<unsigned char>(reply[0]);
    Check(code <= 16, absl::StrCat("reply with status code ", code));
    Check(code == 0 || reply.size() > 1, "an error without a message");
    ++replies;
  }
  Check(reader.buffered() == 0, "a partial reply before the close");
  if (requests >= 0) {  // frames of at most 64 KiB: every one is answered
    Check(replies == requests,
          absl::StrCat(replies, " replies to ", requests, " complete requests"));
  }
  h.CheckSane();
  h.Clear();
  return 0;
}
