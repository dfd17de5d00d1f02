#include "cachemgr/service/fast_path_server.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cachemgr/service/request_errors.h"
#include "cachemgr/service/session_calls.h"
#include "cachemgr/util/fast_path_wire.h"
#include "cachemgr/util/log.h"

namespace cachemgr {

struct FastPathServer::Connection {
  Connection(UniqueFd socket, std::optional<PeerCredentials> credentials)
      : fd(std::move(socket)), peer(credentials), reader(kMaxFastRequestBytes) {}

  UniqueFd fd;
  std::optional<PeerCredentials> peer;
  FastFrameReader reader;
  std::string out;           // reply frames not yet sent
  size_t out_sent = 0;       // bytes of `out` already sent
  bool read_closed = false;  // the peer shut down its side (EOF)
  bool broken = false;       // a frame error was answered: close once it is sent
  uint32_t interest = 0;     // events registered with epoll

  size_t queued() const { return out.size() - out_sent; }
};

namespace {

constexpr uint64_t kWakeTag = ~uint64_t{0};
constexpr size_t kReadChunk = 64 << 10;

std::string ErrnoText(int err) { return absl::StrCat(std::strerror(err), " (errno ", err, ")"); }

void AppendReply(const absl::Status& status, const google::protobuf::Message* response,
                 std::string* out) {
  const size_t header_at = out->size();
  AppendFastFrameHeader(0, out);
  out->push_back(static_cast<char>(status.code()));
  if (status.ok()) {
    response->AppendToString(out);
  } else {
    out->append(status.message().data(), status.message().size());
  }
  const size_t body = out->size() - header_at - kFastFrameHeaderBytes;
  std::string header;
  AppendFastFrameHeader(static_cast<uint32_t>(body), &header);
  out->replace(header_at, kFastFrameHeaderBytes, header);
}

// Runs one call: parses `payload` as `Request`, builds the caller, runs `call`.
template <typename Request, typename Response>
absl::Status RunCall(CacheManager& manager, std::string_view payload, Caller caller,
                     absl::Status (*call)(CacheManager&, const Caller&, const Request&, Response*),
                     std::unique_ptr<google::protobuf::Message>* response) {
  auto out = std::make_unique<Response>();
  Request request;
  if (!request.ParseFromArray(payload.data(), static_cast<int>(payload.size()))) {
    return absl::InvalidArgumentError(
        UnparseableRequestMessage(Request::descriptor()->full_name()));
  }
  caller.session_token = request.session_token();
  const absl::Status status = call(manager, caller, request, out.get());
  *response = std::move(out);
  return status;
}

}  // namespace

absl::StatusOr<std::unique_ptr<FastPathServer>> FastPathServer::Start(CacheManager* manager,
                                                                      Metrics* metrics,
                                                                      absl::Duration spin) {
  std::unique_ptr<FastPathServer> server(new FastPathServer(manager, metrics, spin));
  server->epoll_.reset(epoll_create1(EPOLL_CLOEXEC));
  if (!server->epoll_.valid()) {
    return absl::InternalError(absl::StrCat("fast path: epoll_create1: ", ErrnoText(errno)));
  }
  server->wake_.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!server->wake_.valid()) {
    return absl::InternalError(absl::StrCat("fast path: eventfd: ", ErrnoText(errno)));
  }
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.u64 = kWakeTag;
  if (epoll_ctl(server->epoll_.get(), EPOLL_CTL_ADD, server->wake_.get(), &event) != 0) {
    return absl::InternalError(absl::StrCat("fast path: epoll_ctl: ", ErrnoText(errno)));
  }
  server->thread_ = std::thread([s = server.get()] { s->Serve(); });
  return server;
}

FastPathServer::FastPathServer(CacheManager* manager, Metrics* metrics, absl::Duration spin)
    : manager_(manager), metrics_(metrics), spin_(spin) {}

FastPathServer::~FastPathServer() { Stop(); }

void FastPathServer::Adopt(UniqueFd connection, std::optional<PeerCredentials> peer) {
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) return;  // closes `connection`
    pending_.emplace_back(std::move(connection), peer);
  }
  const uint64_t one = 1;
  (void)!write(wake_.get(), &one, sizeof(one));
}

void FastPathServer::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) return;
    stopped_ = true;
    pending_.clear();
  }
  stopping_.store(true);
  const uint64_t one = 1;
  (void)!write(wake_.get(), &one, sizeof(one));
  if (thread_.joinable()) thread_.join();
  connections_.clear();
}

size_t FastPathServer::connections() const {
  absl::MutexLock lock(&mu_);
  return open_;
}

void FastPathServer::Serve() {
  constexpr int kMaxEvents = 64;
  epoll_event events[kMaxEvents];
  ThrottledLog wait_failed(LogLevel::kError, "fast path: epoll_wait failed");
  absl::Time spin_until = absl::InfinitePast();
  while (!stopping_.load()) {
    // Poll without sleeping while the spin after the last answer lasts.
    const bool spinning = absl::Now() < spin_until;
    const int n = epoll_wait(epoll_.get(), events, kMaxEvents, spinning ? 0 : -1);
    if (n == 0) continue;
    if (n < 0) {
      if (errno != EINTR) {
        wait_failed.Record(absl::Now(), {"error", ErrnoText(errno)});
        absl::SleepFor(absl::Milliseconds(10));
      }
      continue;
    }
    for (int i = 0; i < n; ++i) {
      if (events[i].data.u64 == kWakeTag) {
        uint64_t count = 0;
        (void)!read(wake_.get(), &count, sizeof(count));
        AdoptPending();
        continue;
      }
      const int fd = events[i].data.fd;
      auto it = connections_.find(fd);
      if (it == connections_.end()) continue;
      if (!Service(*it->second, events[i].events)) Close(fd);
      spin_until = spin_ > absl::ZeroDuration() ? absl::Now() + spin_ : absl::InfinitePast();
    }
  }
}

void FastPathServer::AdoptPending() {
  std::vector<std::pair<UniqueFd, std::optional<PeerCredentials>>> adopted;
  {
    absl::MutexLock lock(&mu_);
    adopted.swap(pending_);
  }
  for (auto& [fd, peer] : adopted) {
    const int raw = fd.get();
    auto c = std::make_unique<Connection>(std::move(fd), peer);
    epoll_event event{};
    event.events = EPOLLIN | EPOLLRDHUP;
    event.data.fd = raw;
    if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, raw, &event) != 0) {
      Log(LogLevel::kError, "fast path: cannot watch a connection", {{"error", ErrnoText(errno)}});
      continue;  // closes it
    }
    c->interest = event.events;
    if (peer.has_value()) {
      Log(LogLevel::kDebug, "fast path: connection opened",
          {{"pid", static_cast<int64_t>(peer->pid)}, {"uid", static_cast<uint64_t>(peer->uid)}});
    }
    connections_.emplace(raw, std::move(c));
    absl::MutexLock lock(&mu_);
    ++open_;
  }
}

void FastPathServer::Close(int fd) {
  auto it = connections_.find(fd);
  if (it == connections_.end()) return;
  (void)epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  connections_.erase(it);  // closes the socket
  absl::MutexLock lock(&mu_);
  --open_;
}

bool FastPathServer::Service(Connection& c, uint32_t events) {
  if ((events & EPOLLERR) != 0) return false;
  // Read while there is room: a request may be up to kMaxFastRequestBytes, and replies wait
  // for a slow reader up to kMaxQueuedReplyBytes.
  if ((events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP)) != 0 && !c.read_closed && !c.broken) {
    char chunk[kReadChunk];
    while (c.queued() < kMaxQueuedReplyBytes &&
           c.reader.buffered() < kMaxFastRequestBytes + kFastFrameHeaderBytes) {
      const ssize_t got = recv(c.fd.get(), chunk, sizeof(chunk), 0);
      if (got > 0) {
        c.reader.Append(std::string_view(chunk, static_cast<size_t>(got)));
        if (static_cast<size_t>(got) < sizeof(chunk)) break;
        continue;
      }
      if (got == 0) {
        c.read_closed = true;
        break;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      return false;  // ECONNRESET and the like
    }
  }
  for (;;) {
    // Answer the complete requests while replies fit.
    bool out_of_room = false;
    while (!c.broken) {
      if (c.queued() >= kMaxQueuedReplyBytes) {
        out_of_room = true;
        break;
      }
      absl::StatusOr<std::optional<std::string_view>> body = c.reader.Next();
      if (!body.ok()) {
        AppendReply(body.status(), nullptr, &c.out);
        c.broken = true;
        break;
      }
      if (!body->has_value()) break;
      Answer(c, **body);
    }
    // Send what is queued.
    while (c.queued() > 0) {
      const ssize_t sent =
          send(c.fd.get(), c.out.data() + c.out_sent, c.queued(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (sent > 0) {
        c.out_sent += static_cast<size_t>(sent);
        continue;
      }
      if (sent < 0 && errno == EINTR) continue;
      if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      return false;  // EPIPE, ECONNRESET: the peer is gone
    }
    if (c.queued() > 0) break;  // the peer is not reading: wait for EPOLLOUT
    c.out.clear();
    c.out_sent = 0;
    if (!out_of_room) break;
  }
  // Finished: a frame error was answered, or the peer closed its side and every complete
  // request it sent was answered (a partial one is dropped: nothing of it was applied).
  if (c.queued() == 0 && (c.broken || c.read_closed)) return false;
  UpdateInterest(c);
  return true;
}

void FastPathServer::Answer(Connection& c, std::string_view body) {
  const absl::Time start = absl::Now();
  const uint8_t method = static_cast<uint8_t>(body.front());
  const std::optional<std::string_view> name = FastMethodName(method);
  if (!name.has_value()) {
    AppendReply(absl::UnimplementedError(
                    absl::StrCat("fast path method ", method,
                                 " is unknown (1 Heartbeat, 2 Allocate, 3 Free, 4 Fork, 5 Step)")),
                nullptr, &c.out);
    return;
  }
  Caller caller;
  caller.arrival = manager_->Now();  // on the manager's clock, which judges leases by it
  caller.peer = c.peer;
  const std::string_view payload = body.substr(1);
  absl::Status status;
  std::unique_ptr<google::protobuf::Message> response;
  if (draining_.load()) {
    status = absl::UnavailableError("cachemgrd is shutting down");
  } else {
    CacheManager& manager = *manager_;
    switch (static_cast<FastMethod>(method)) {
      case FastMethod::kHeartbeat:
        status = RunCall(manager, payload, caller, &HeartbeatCall, &response);
        break;
      case FastMethod::kAllocate:
        status = RunCall(manager, payload, caller, &AllocateCall, &response);
        break;
      case FastMethod::kFree:
        status = RunCall(manager, payload, caller, &FreeCall, &response);
        break;
      case FastMethod::kFork:
        status = RunCall(manager, payload, caller, &ForkCall, &response);
        break;
      case FastMethod::kStep:
        status = RunCall(manager, payload, caller, &StepCall, &response);
        break;
    }
  }
  if (status.ok() && response->ByteSizeLong() >= uint64_t{0xffffffff}) {
    status = absl::ResourceExhaustedError("reply does not fit a fast path frame");
  }
  AppendReply(status, response.get(), &c.out);
  if (metrics_ != nullptr) {
    metrics_->ObserveRpc(std::string(*name), absl::StatusCodeToString(status.code()),
                         absl::Now() - start);
  }
}

void FastPathServer::UpdateInterest(Connection& c) {
  uint32_t want = 0;
  const bool can_read = !c.read_closed && !c.broken && c.queued() < kMaxQueuedReplyBytes &&
                        c.reader.buffered() < kMaxFastRequestBytes + kFastFrameHeaderBytes;
  if (can_read) want |= EPOLLIN | EPOLLRDHUP;
  if (c.queued() > 0) want |= EPOLLOUT;
  if (want == c.interest) return;
  epoll_event event{};
  event.events = want;
  event.data.fd = c.fd.get();
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, c.fd.get(), &event) == 0) c.interest = want;
}

}  // namespace cachemgr
