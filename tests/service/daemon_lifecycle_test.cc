// The real cachemgrd binary: startup, sockets and permissions, health, refusal to run twice,
// graceful shutdown on SIGTERM/SIGINT with memory released and sockets removed.
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "cachemgr/client/client.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

grpc::health::v1::HealthCheckResponse::ServingStatus Health(const std::string& socket,
                                                            const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  if (!stub->Check(&ctx, req, &resp).ok()) return grpc::health::v1::HealthCheckResponse::UNKNOWN;
  return resp.status();
}

TEST_CASE("daemon serves on 0600 sockets, reports healthy, and stops cleanly", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  CHECK(FileMode(socket) == 0600);
  CHECK(FileMode(socket + ".share") == 0600);
  CHECK(FileMode(socket + ".fast") == 0600);
  CHECK(FileMode(socket + ".operator") == 0600);
  CHECK(Health(socket, "") == grpc::health::v1::HealthCheckResponse::SERVING);
  CHECK(Health(socket, "cachemgr.v1.CacheManager") ==
        grpc::health::v1::HealthCheckResponse::SERVING);

  client::AttachOptions options;
  options.client_name = "lifecycle";
  options.model.name = "m";
  options.model.num_layers = 2;
  options.model.num_q_heads = 2;
  options.model.num_kv_heads = 1;
  options.model.head_dim = 8;
  options.num_blocks = 8;
  options.auto_heartbeat = false;
  auto session = client::Session::Attach(socket, options);
  REQUIRE(session.ok());
  REQUIRE((*session)->Allocate("s", 20).ok());
  CHECK((*session)->fast_path_calls() == 1);

  auto code = (*daemon)->Terminate(SIGTERM);
  REQUIRE(code.ok());
  CHECK(*code == 0);
  CHECK(access(socket.c_str(), F_OK) != 0);
  CHECK(access((socket + ".share").c_str(), F_OK) != 0);
  CHECK(access((socket + ".fast").c_str(), F_OK) != 0);
  CHECK(access((socket + ".operator").c_str(), F_OK) != 0);
  CHECK(access((socket + ".lock").c_str(), F_OK) != 0);
  const std::string log = (*daemon)->log_contents();
  CHECK_THAT(log, Catch::Contains("\"msg\":\"cachemgrd serving\""));
  CHECK_THAT(log, Catch::Contains("\"msg\":\"signal received\""));
  CHECK_THAT(log, Catch::Contains("\"msg\":\"pool released\""));
  CHECK_THAT(log, Catch::Contains("\"msg\":\"cachemgrd stopped\""));
  // Calls after shutdown fail instead of hanging.
  auto after = (*session)->Heartbeat();
  CHECK(after.status().code() == absl::StatusCode::kUnavailable);
}

TEST_CASE("--check_invariants_ms checks the books while clients come, go and expire", "[service]") {
  auto daemon = DaemonProcess::Start(
      // The lease is short so the held client expires within the test, and long enough that this
      // test's own session keeps it under a sanitizer on a loaded machine.
      {"--check_invariants_ms=5", "--lease_timeout_ms=1500", "--heartbeat_interval_ms=100"});
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  // A client that stops heartbeating: its lease expires and its blocks are quarantined.
  auto held = ChildProcess::Spawn(KvClientPath(), {"--socket=" + socket, "--hold"});
  REQUIRE(held.ok());
  REQUIRE((*held)->ReadLine(absl::Seconds(20)).ok());
  client::AttachOptions options;
  options.client_name = "books";
  options.model.name = "stories260K";
  options.model.num_layers = 5;
  options.model.num_q_heads = 8;
  options.model.num_kv_heads = 4;
  options.model.head_dim = 8;
  options.model.dtype = client::DType::kFp32;
  auto session = client::Session::Attach(socket, options);
  REQUIRE(session.ok());
  for (int i = 0; i < 20; ++i) {
    const std::string id = absl::StrCat("s", i);
    INFO("round " << i);
    const auto allocated = (*session)->Allocate(id, 1 + i * 3);
    REQUIRE(allocated.status().ToString() == "OK");
    const auto forked = (*session)->Fork(id, id + "-fork");
    REQUIRE(forked.status().ToString() == "OK");
    const auto written = (*session)->Allocate(id + "-fork", 2);  // copy on write
    REQUIRE(written.status().ToString() == "OK");
    const auto freed = (*session)->Free(id);
    REQUIRE(freed.status().ToString() == "OK");
  }
  REQUIRE((*session)->Detach().ok());
  // The held client expires, its quarantine ends and its pool goes.
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (UsedBlocks(*RawStub(socket)) != 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  absl::SleepFor(absl::Seconds(1));
  auto code = (*daemon)->Terminate(SIGTERM);
  REQUIRE(code.ok());
  CHECK(*code == 0);  // a violation would have aborted it
  const std::string log = (*daemon)->log_contents();
  CHECK_THAT(log, Catch::Contains("\"msg\":\"client lease expired\""));
  CHECK_THAT(log, !Catch::Contains("invariant violated"));
  // The reaper's last report counts the checks it ran.
  const size_t at = log.rfind("\"msg\":\"invariants hold\"");
  REQUIRE(at != std::string::npos);
  const size_t checks = log.find("\"checks\":", at);
  REQUIRE(checks != std::string::npos);
  CHECK(std::stoull(log.substr(checks + 9)) >= 10);
}

TEST_CASE("SIGINT also shuts down gracefully", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  auto code = (*daemon)->Terminate(SIGINT);
  REQUIRE(code.ok());
  CHECK(*code == 0);
  CHECK(access((*daemon)->socket_path().c_str(), F_OK) != 0);
}

TEST_CASE("a second daemon on the same socket refuses to start", "[service]") {
  auto first = DaemonProcess::Start();
  REQUIRE(first.ok());
  auto second = ChildProcess::Spawn(DaemonPath(), {"--socket=" + (*first)->socket_path()});
  REQUIRE(second.ok());
  auto code = (*second)->Wait(absl::Seconds(10));
  REQUIRE(code.ok());
  CHECK(*code == 1);
  // The first one is unharmed.
  CHECK(Health((*first)->socket_path(), "") == grpc::health::v1::HealthCheckResponse::SERVING);
}

// Runs cachemgrd with `args` and waits for it to exit: its code (124 when it still ran after
// 20 s, as a daemon that took over would) and output.
std::pair<int, std::string> RunToExit(const TempDir& dir, const std::vector<std::string>& args) {
  const std::string out = dir.file("second.out");
  const std::string command =
      absl::StrCat("timeout 20 ", DaemonPath(), " ", absl::StrJoin(args, " "), " >", out, " 2>&1");
  const int status = std::system(command.c_str());
  std::ifstream in(out);
  std::stringstream text;
  text << in.rdbuf();
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, text.str()};
}

TEST_CASE("a second daemon cannot take over a live daemon's share socket", "[service]") {
  auto first = DaemonProcess::Start();
  REQUIRE(first.ok());
  const std::string socket = (*first)->socket_path();
  const std::string share = socket + ".share";
  TempDir other;
  // Another gRPC socket, the same share socket: refused, naming the holder.
  const auto [code, out] =
      RunToExit(other, {"--socket=" + other.file("b.sock"), "--share_socket=" + share});
  CHECK(code == 1);
  CHECK_THAT(out, Catch::Contains("FAILED_PRECONDITION") &&
                      Catch::Contains(absl::StrCat("another cachemgrd (pid ", (*first)->pid(),
                                                   ") holds ", share, ".lock")));
  // The same gRPC socket with another share socket: refused as well.
  const auto [code2, out2] =
      RunToExit(other, {"--socket=" + socket, "--share_socket=" + other.file("b.share")});
  CHECK(code2 == 1);
  CHECK_THAT(out2, Catch::Contains(absl::StrCat("(pid ", (*first)->pid(), ")")));
  CHECK(access(other.file("b.sock").c_str(), F_OK) != 0);
  // The first daemon's share channel still hands out pools: a full attach works.
  client::AttachOptions options;
  options.client_name = "still-here";
  options.model.name = "m";
  options.model.num_layers = 2;
  options.model.num_q_heads = 2;
  options.model.num_kv_heads = 1;
  options.model.head_dim = 8;
  options.num_blocks = 8;
  options.auto_heartbeat = false;
  auto session = client::Session::Attach(socket, options);
  REQUIRE(session.ok());
  CHECK((*session)->Allocate("s", 5).ok());
  // A lock left by a daemon that died (SIGKILL) does not block its successor.
  REQUIRE((*first)->Terminate(SIGKILL).ok());
  auto successor = ChildProcess::Spawn(DaemonPath(), {"--socket=" + socket});
  REQUIRE(successor.ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  bool serving = false;
  while (!serving && absl::Now() < deadline) {
    serving = Health(socket, "") == grpc::health::v1::HealthCheckResponse::SERVING;
    if (!serving) absl::SleepFor(absl::Milliseconds(50));
  }
  CHECK(serving);
}

TEST_CASE("bad flags exit with status 2 and a message naming the flag", "[service]") {
  auto child = ChildProcess::Spawn(DaemonPath(), {"--lease_timeout_ms=zero"});
  REQUIRE(child.ok());
  auto code = (*child)->Wait(absl::Seconds(10));
  REQUIRE(code.ok());
  CHECK(*code == 2);
}

}  // namespace
}  // namespace cachemgr::testing
