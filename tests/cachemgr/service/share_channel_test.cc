#include "cachemgr/service/share_channel.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cachemgr/host/memfd_region.h"
#include "cachemgr/service/peer_policy.h"
#include "cachemgr/util/fd_passing.h"
#include "tests/support/temp_dir.h"

namespace cachemgr {
namespace {

constexpr size_t kRegionBytes = 64 * 1024;
constexpr char kBadTokenMessage[] = "session_token does not name an attached client";

// A server over two memfd regions that hands them out for token "good"; it admits the
// process's own uid, root and `allowed_uids`.
struct Fixture {
  explicit Fixture(ShareChannelLimits limits = {}, std::vector<uid_t> allowed_uids = {})
      : policy(::geteuid(), std::move(allowed_uids), std::nullopt) {
    auto r0 = MemfdRegion::Create("share-test-0", kRegionBytes);
    auto r1 = MemfdRegion::Create("share-test-1", kRegionBytes);
    REQUIRE(r0.ok());
    REQUIRE(r1.ok());
    regions[0] = std::move(*r0);
    regions[1] = std::move(*r1);
    path = dir.file("share.sock");
    auto started = ShareChannelServer::Start(
        path, &policy,
        [this](const std::string& token,
               const PeerCredentials& peer) -> absl::StatusOr<std::vector<int>> {
          {
            std::lock_guard<std::mutex> lock(mu);
            tokens_seen.push_back(token);
            peer_uids_seen.push_back(peer.uid);
          }
          if (token != "good") return absl::NotFoundError(kBadTokenMessage);
          return std::vector<int>{regions[0].fd(), regions[1].fd()};
        },
        limits);
    REQUIRE(started.ok());
    server = std::move(*started);
  }

  std::vector<std::string> Tokens() {
    std::lock_guard<std::mutex> lock(mu);
    return tokens_seen;
  }

  PeerPolicy policy;
  testing::TempDir dir;
  std::string path;
  MemfdRegion regions[2];
  std::mutex mu;
  std::vector<std::string> tokens_seen;
  std::vector<uid_t> peer_uids_seen;
  std::unique_ptr<ShareChannelServer> server;
};

// Sends a raw payload and returns the daemon's reply payload.
std::string RawRequest(const std::string& path, const std::string& payload) {
  auto conn = ConnectSeqpacket(path);
  REQUIRE(conn.ok());
  REQUIRE(SendFdMessage(conn->get(), payload, {}).ok());
  auto reply = ReceiveFdMessage(conn->get());
  REQUIRE(reply.ok());
  CHECK(reply->fds.empty());
  // The daemon closes the connection after one reply.
  CHECK(ReceiveFdMessage(conn->get()).status().code() == absl::StatusCode::kUnavailable);
  return reply->payload;
}

bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

// Connections that never send a request; each fails its receives after 20 s instead of hanging.
std::vector<UniqueFd> ConnectIdle(const std::string& path, size_t n) {
  std::vector<UniqueFd> idle;
  const timeval tv = {20, 0};
  for (size_t i = 0; i < n; ++i) {
    auto conn = ConnectSeqpacket(path);
    REQUIRE(conn.ok());
    REQUIRE(::setsockopt(conn->get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0);
    idle.push_back(std::move(*conn));
  }
  return idle;
}

// The payload of the daemon's one message on `conn`, after which it must hang up.
std::string ReplyThenEof(int conn) {
  auto reply = ReceiveFdMessage(conn);
  REQUIRE(reply.ok());
  CHECK(reply->fds.empty());
  CHECK(ReceiveFdMessage(conn).status().code() == absl::StatusCode::kUnavailable);
  return reply->payload;
}

std::chrono::steady_clock::duration TimeFetch(const std::string& path) {
  const auto start = std::chrono::steady_clock::now();
  auto fds = FetchSharedFds(path, "good");
  const auto elapsed = std::chrono::steady_clock::now() - start;
  REQUIRE(fds.ok());
  CHECK(fds->size() == 2);
  return elapsed;
}

TEST_CASE("a good token yields descriptors of the daemon's regions", "[cpu]") {
  Fixture f;
  auto fds = FetchSharedFds(f.path, "good");
  REQUIRE(fds.ok());
  REQUIRE(fds->size() == 2);
  CHECK(f.Tokens() == std::vector<std::string>{"good"});

  std::vector<MemfdRegion> mapped;
  for (UniqueFd& fd : *fds) {
    CHECK((::fcntl(fd.get(), F_GETFD) & FD_CLOEXEC) != 0);
    auto m = MemfdRegion::Map(std::move(fd), kRegionBytes);
    REQUIRE(m.ok());
    mapped.push_back(std::move(*m));
  }
  // Same bytes, in order, both directions.
  std::memcpy(f.regions[0].data(), "region zero", 11);
  std::memcpy(f.regions[1].data() + 100, "region one", 10);
  CHECK(std::memcmp(mapped[0].data(), "region zero", 11) == 0);
  CHECK(std::memcmp(mapped[1].data() + 100, "region one", 10) == 0);
  std::memcpy(mapped[1].data() + kRegionBytes - 6, "client", 6);
  CHECK(std::memcmp(f.regions[1].data() + kRegionBytes - 6, "client", 6) == 0);

  // The server keeps serving: a second fetch works too.
  auto again = FetchSharedFds(f.path, "good");
  REQUIRE(again.ok());
  CHECK(again->size() == 2);
}

TEST_CASE("a bad token maps back to NOT_FOUND with the daemon's message", "[cpu]") {
  Fixture f;
  auto fds = FetchSharedFds(f.path, "not-a-session");
  CHECK(fds.status().code() == absl::StatusCode::kNotFound);
  CHECK(std::string(fds.status().message()) == kBadTokenMessage);
  CHECK(f.Tokens() == std::vector<std::string>{"not-a-session"});
  CHECK(RawRequest(f.path, "SHARE nope") == std::string("ERR NOT_FOUND ") + kBadTokenMessage);
}

TEST_CASE("malformed requests get INVALID_ARGUMENT without reaching the resolver", "[cpu]") {
  Fixture f;
  for (const std::string& garbage :
       {std::string("GIMME good"), std::string("SHARE"), std::string("SHARE "),
        std::string("SHARE good extra"), std::string("SHARE good\n"), std::string("share good"),
        std::string("")}) {
    CAPTURE(garbage);
    CHECK(StartsWith(RawRequest(f.path, garbage), "ERR INVALID_ARGUMENT "));
  }
  // A request carrying descriptors is refused as well.
  auto conn = ConnectSeqpacket(f.path);
  REQUIRE(conn.ok());
  REQUIRE(SendFdMessage(conn->get(), "SHARE good", {f.regions[0].fd()}).ok());
  auto reply = ReceiveFdMessage(conn->get());
  REQUIRE(reply.ok());
  CHECK(StartsWith(reply->payload, "ERR INVALID_ARGUMENT "));
  CHECK(f.Tokens().empty());
}

TEST_CASE("a silent client does not stall the server beyond the request timeout", "[cpu]") {
  Fixture f;
  auto silent = ConnectSeqpacket(f.path);
  REQUIRE(silent.ok());
  // Let the server accept the silent connection first so the good client queues behind it.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));

  const auto start = std::chrono::steady_clock::now();
  auto fds = FetchSharedFds(f.path, "good");
  const auto elapsed = std::chrono::steady_clock::now() - start;
  REQUIRE(fds.ok());
  CHECK(fds->size() == 2);
  CHECK(elapsed < std::chrono::milliseconds(2500));  // timeout is 1 s; generous slack

  // The silent client was told why and disconnected.
  auto reply = ReceiveFdMessage(silent->get());
  REQUIRE(reply.ok());
  CHECK(StartsWith(reply->payload, "ERR DEADLINE_EXCEEDED "));
  CHECK(ReceiveFdMessage(silent->get()).status().code() == absl::StatusCode::kUnavailable);
}

TEST_CASE("idle connections do not delay another client's request", "[cpu]") {
  Fixture f;
  // The old one-at-a-time server gave each idle connection its full 1 s timeout before the
  // next, so this fetch waited 40 s (and FetchSharedFds gave up after 30).
  std::vector<UniqueFd> idle = ConnectIdle(f.path, 40);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let the server accept them
  CHECK(TimeFetch(f.path) < std::chrono::seconds(3));           // generous: a round trip is ~100 us

  // Every idle connection is still told, at its own deadline, why it is closed.
  for (UniqueFd& conn : idle) {
    CHECK(StartsWith(ReplyThenEof(conn.get()), "ERR DEADLINE_EXCEEDED "));
  }
  CHECK(f.Tokens() == std::vector<std::string>{"good"});
}

TEST_CASE("requests on many open connections are answered whatever their order", "[cpu]") {
  Fixture f;
  std::vector<UniqueFd> conns = ConnectIdle(f.path, 16);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // all accepted and waiting
  // The newest asks first: nothing makes it wait for the older ones.
  for (size_t i = conns.size(); i-- > 0;) {
    REQUIRE(SendFdMessage(conns[i].get(), i % 2 == 0 ? "SHARE good" : "SHARE bad", {}).ok());
  }
  for (size_t i = 0; i < conns.size(); ++i) {
    CAPTURE(i);
    auto reply = ReceiveFdMessage(conns[i].get());
    REQUIRE(reply.ok());
    if (i % 2 == 0) {
      CHECK(reply->payload == "OK 2");
      CHECK(reply->fds.size() == 2);
    } else {
      CHECK(reply->payload == std::string("ERR NOT_FOUND ") + kBadTokenMessage);
    }
  }
  CHECK(f.Tokens().size() == conns.size());
}

TEST_CASE("waiting connections are capped: the oldest makes room, with a reply", "[cpu]") {
  // A long request timeout, so only the cap (not a deadline) can close the idle ones.
  Fixture f({.request_timeout = absl::Seconds(60), .max_connections = 4});
  std::vector<UniqueFd> idle = ConnectIdle(f.path, 6);

  // The two oldest were closed to admit the two newest, and told why.
  for (size_t i = 0; i < 2; ++i) {
    CAPTURE(i);
    CHECK(StartsWith(ReplyThenEof(idle[i].get()), "ERR RESOURCE_EXHAUSTED "));
  }
  // A client that sends as it connects is answered at once even with every slot taken.
  CHECK(TimeFetch(f.path) < std::chrono::seconds(3));
  // The four newest are still open and waiting (nothing queued for them yet)... except that the
  // fetch's connection may have been accepted before its request arrived (a loaded machine),
  // taking a slot and closing the oldest waiting one, idle[2], with a reply.
  REQUIRE(::fcntl(idle[2].get(), F_SETFL, O_NONBLOCK) == 0);
  if (absl::StatusOr<FdMessage> evicted = ReceiveFdMessage(idle[2].get()); evicted.ok()) {
    CHECK(StartsWith(evicted->payload, "ERR RESOURCE_EXHAUSTED "));
  } else {
    CHECK(evicted.status().code() == absl::StatusCode::kDeadlineExceeded);
  }
  for (size_t i = 3; i < idle.size(); ++i) {
    CAPTURE(i);
    REQUIRE(::fcntl(idle[i].get(), F_SETFL, O_NONBLOCK) == 0);
    CHECK(ReceiveFdMessage(idle[i].get()).status().code() ==
          absl::StatusCode::kDeadlineExceeded);  // EAGAIN: open, nothing sent
  }
  // ...and still served when they finally ask.
  REQUIRE(SendFdMessage(idle[5].get(), "SHARE good", {}).ok());
  pollfd pfd{idle[5].get(), POLLIN, 0};
  REQUIRE(::poll(&pfd, 1, 20000) == 1);
  auto reply = ReceiveFdMessage(idle[5].get());
  REQUIRE(reply.ok());
  CHECK(reply->payload == "OK 2");
  // Stop closes the rest.
  f.server->Stop();
  for (size_t i = 3; i < 5; ++i) {
    REQUIRE(::fcntl(idle[i].get(), F_SETFL, 0) == 0);
    CHECK(ReceiveFdMessage(idle[i].get()).status().code() == absl::StatusCode::kUnavailable);
  }
}

TEST_CASE("the server rejects limits it cannot honour", "[cpu]") {
  testing::TempDir dir;
  auto resolver = [](const std::string&,
                     const PeerCredentials&) -> absl::StatusOr<std::vector<int>> {
    return std::vector<int>{};
  };
  const PeerPolicy policy(::geteuid(), {}, std::nullopt);
  CHECK(ShareChannelServer::Start(dir.file("a.sock"), &policy, resolver, {.max_connections = 0})
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(ShareChannelServer::Start(dir.file("b.sock"), &policy, resolver,
                                  {.request_timeout = absl::ZeroDuration()})
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
}

// Lowers RLIMIT_NOFILE to what is open now and fills every free slot, so the process (and the
// server in it) is out of descriptors until the destructor, which restores both.
class DescriptorExhaustion {
 public:
  DescriptorExhaustion() {
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved_) == 0);
    int highest = 0;
    for (int fd = 0; fd < 65536; ++fd) {
      if (::fcntl(fd, F_GETFD) != -1) highest = fd;
    }
    rlimit lowered = saved_;
    lowered.rlim_cur = static_cast<rlim_t>(highest) + 1;
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &lowered) == 0);
    for (;;) {
      const int fd = ::dup(STDIN_FILENO);
      if (fd < 0) break;
      fillers_.emplace_back(fd);
    }
    CHECK(errno == EMFILE);
  }
  ~DescriptorExhaustion() {
    fillers_.clear();
    ::setrlimit(RLIMIT_NOFILE, &saved_);
  }

 private:
  rlimit saved_{};
  std::vector<UniqueFd> fillers_;
};

TEST_CASE("out of descriptors, open connections are served and accepting recovers", "[cpu]") {
  Fixture f;
  auto early = ConnectSeqpacket(f.path);  // accepted while descriptors are plentiful
  REQUIRE(early.ok());
  // Created now; connected once no descriptor is left for the server to accept it with.
  UniqueFd late(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  REQUIRE(late.valid());
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, f.path.c_str(), f.path.size() + 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let the server accept `early`
  const timeval tv = {20, 0};
  REQUIRE(::setsockopt(early->get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0);
  REQUIRE(::setsockopt(late.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0);
  {
    DescriptorExhaustion exhausted;
    REQUIRE(::connect(late.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0);
    REQUIRE(SendFdMessage(late.get(), "SHARE good", {}).ok());
    // The server's accept() now fails with EMFILE; the connection it already holds is still
    // answered (a reply without descriptors: there is no room to receive any).
    REQUIRE(SendFdMessage(early->get(), "SHARE nope", {}).ok());
    auto reply = ReceiveFdMessage(early->get());
    REQUIRE(reply.ok());
    CHECK(reply->payload == std::string("ERR NOT_FOUND ") + kBadTokenMessage);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // a few failed accepts
  }
  // Descriptors are back: the queued connection is accepted and answered on the server's own.
  auto reply = ReceiveFdMessage(late.get());
  REQUIRE(reply.ok());
  CHECK(reply->payload == "OK 2");
  CHECK(reply->fds.size() == 2);
  CHECK(f.Tokens() == std::vector<std::string>{"nope", "good"});
}

TEST_CASE("FetchSharedFds maps every error code and checks the descriptor count", "[cpu]") {
  testing::TempDir dir;
  const std::string path = dir.file("fake.sock");
  // A fake daemon whose reply the test chooses.
  auto listener = ListenSeqpacket(path);
  REQUIRE(listener.ok());
  auto serve_once = [&](const std::string& reply, std::vector<int> fds) {
    // Catch2 assertions are not thread-safe: the fake daemon only records what it saw.
    std::string request;
    absl::Status sent = absl::UnknownError("not served");
    std::thread t([&] {
      UniqueFd conn(::accept4(listener->get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!conn.valid()) return;
      auto req = ReceiveFdMessage(conn.get());
      if (!req.ok()) return;
      request = req->payload;
      sent = SendFdMessage(conn.get(), reply, fds);
    });
    auto result = FetchSharedFds(path, "tok");
    t.join();
    CHECK(request == "SHARE tok");
    CHECK(sent.ok());
    return result;
  };

  for (int i = 1; i <= 16; ++i) {
    const auto code = static_cast<absl::StatusCode>(i);
    auto r = serve_once("ERR " + absl::StatusCodeToString(code) + " why " + std::to_string(i), {});
    CHECK(r.status().code() == code);
    CHECK(std::string(r.status().message()) == "why " + std::to_string(i));
  }
  auto no_message = serve_once("ERR UNAVAILABLE", {});
  CHECK(no_message.status().code() == absl::StatusCode::kUnavailable);
  CHECK(no_message.status().message().empty());
  CHECK(serve_once("ERR BOGUS_CODE x", {}).status().code() == absl::StatusCode::kUnknown);
  CHECK(serve_once("ERR OK x", {}).status().code() == absl::StatusCode::kUnknown);
  CHECK(serve_once("HELLO", {}).status().code() == absl::StatusCode::kInternal);
  CHECK(serve_once("OK x", {}).status().code() == absl::StatusCode::kInternal);

  auto region = MemfdRegion::Create("count", 4096);
  REQUIRE(region.ok());
  CHECK(serve_once("OK 2", {region->fd()}).status().code() == absl::StatusCode::kDataLoss);
  CHECK(serve_once("OK 0", {region->fd()}).status().code() == absl::StatusCode::kDataLoss);
  auto one = serve_once("OK 1", {region->fd()});
  REQUIRE(one.ok());
  CHECK(one->size() == 1);
}

TEST_CASE("socket file is 0600 and Stop removes it", "[cpu]") {
  Fixture f;
  struct stat st = {};
  REQUIRE(::lstat(f.path.c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 07777) == 0600);
  CHECK(f.server->path() == f.path);

  f.server->Stop();
  CHECK(::lstat(f.path.c_str(), &st) == -1);
  CHECK(errno == ENOENT);
  f.server->Stop();  // idempotent
  CHECK(FetchSharedFds(f.path, "good").status().code() == absl::StatusCode::kUnavailable);
}

TEST_CASE("Stop leaves a successor's socket at the same path alone", "[cpu]") {
  testing::TempDir dir;
  const std::string path = dir.file("share.sock");
  auto resolver = [](const std::string&,
                     const PeerCredentials&) -> absl::StatusOr<std::vector<int>> {
    return std::vector<int>{};
  };
  const PeerPolicy policy(::geteuid(), {}, std::nullopt);
  auto first = ShareChannelServer::Start(path, &policy, resolver);
  REQUIRE(first.ok());
  auto second = ShareChannelServer::Start(path, &policy, resolver);  // replaces the file
  REQUIRE(second.ok());
  (*first)->Stop();
  struct stat st = {};
  CHECK(::lstat(path.c_str(), &st) == 0);
  auto fds = FetchSharedFds(path, "any");
  REQUIRE(fds.ok());
  CHECK(fds->empty());
}

// FetchSharedFds(path, "good") from a child running as uid/gid 65534: "OK" or the status.
std::string FetchAsNobody(const std::string& path) {
  int result_pipe[2];
  REQUIRE(::pipe(result_pipe) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(result_pipe[0]);
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(2);
    auto fds = FetchSharedFds(path, "good");
    const std::string out = fds.ok() ? "OK" : fds.status().ToString();
    (void)!::write(result_pipe[1], out.data(), out.size());
    ::_exit(0);
  }
  ::close(result_pipe[1]);
  std::string out;
  char buf[512];
  ssize_t n;
  while ((n = ::read(result_pipe[0], buf, sizeof(buf))) > 0) out.append(buf, n);
  ::close(result_pipe[0]);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  return out;
}

TEST_CASE("a peer with another uid is refused", "[cpu]") {
  if (::geteuid() != 0) {
    WARN("needs root to connect as another uid; skipped");
    return;
  }
  Fixture f;
  // Let another user reach the socket so only the SO_PEERCRED check stands in the way.
  REQUIRE(::chmod(f.dir.path().c_str(), 0755) == 0);
  REQUIRE(::chmod(f.path.c_str(), 0666) == 0);
  const std::string out = FetchAsNobody(f.path);
  CAPTURE(out);
  CHECK(StartsWith(out, "PERMISSION_DENIED"));
  CHECK_THAT(out, Catch::Contains("uid 65534"));
  CHECK(f.Tokens().empty());
}

TEST_CASE("a uid the policy allows reaches the resolver with its credentials", "[cpu]") {
  if (::geteuid() != 0) {
    WARN("needs root to connect as another uid; skipped");
    return;
  }
  Fixture f({}, {65534});
  REQUIRE(::chmod(f.dir.path().c_str(), 0755) == 0);
  REQUIRE(::chmod(f.path.c_str(), 0666) == 0);
  CHECK(FetchAsNobody(f.path) == "OK");
  std::lock_guard<std::mutex> lock(f.mu);
  CHECK(f.peer_uids_seen == std::vector<uid_t>{65534});
}

}  // namespace
}  // namespace cachemgr
