// The real cachemgrd binary: startup, sockets and permissions, health, refusal to run twice,
// graceful shutdown on SIGTERM/SIGINT with memory released and sockets removed.
#include <unistd.h>

#include <catch2/catch.hpp>

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

  auto code = (*daemon)->Terminate(SIGTERM);
  REQUIRE(code.ok());
  CHECK(*code == 0);
  CHECK(access(socket.c_str(), F_OK) != 0);
  CHECK(access((socket + ".share").c_str(), F_OK) != 0);
  const std::string log = (*daemon)->log_contents();
  CHECK_THAT(log, Catch::Contains("\"msg\":\"cachemgrd serving\""));
  CHECK_THAT(log, Catch::Contains("\"msg\":\"signal received\""));
  CHECK_THAT(log, Catch::Contains("\"msg\":\"pool released\""));
  CHECK_THAT(log, Catch::Contains("\"msg\":\"cachemgrd stopped\""));
  // Calls after shutdown fail instead of hanging.
  auto after = (*session)->Heartbeat();
  CHECK(after.status().code() == absl::StatusCode::kUnavailable);
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

TEST_CASE("bad flags exit with status 2 and a message naming the flag", "[service]") {
  auto child = ChildProcess::Spawn(DaemonPath(), {"--lease_timeout_ms=zero"});
  REQUIRE(child.ok());
  auto code = (*child)->Wait(absl::Seconds(10));
  REQUIRE(code.ok());
  CHECK(*code == 2);
}

}  // namespace
}  // namespace cachemgr::testing
