#include "cachemgr/service/share_channel.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
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
  explicit Fixture(std::vector<uid_t> allowed_uids = {})
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
        });
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
  Fixture f({65534});
  REQUIRE(::chmod(f.dir.path().c_str(), 0755) == 0);
  REQUIRE(::chmod(f.path.c_str(), 0666) == 0);
  CHECK(FetchAsNobody(f.path) == "OK");
  std::lock_guard<std::mutex> lock(f.mu);
  CHECK(f.peer_uids_seen == std::vector<uid_t>{65534});
}

}  // namespace
}  // namespace cachemgr
