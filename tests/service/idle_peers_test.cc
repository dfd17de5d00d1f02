// The real cachemgrd against peers that connect and say nothing: idle connections to the share
// socket must not delay a real client's Attach (which fetches the pool's descriptors there),
// and a flood of them is capped with a warning in the log; idle connections to the metrics
// port must not delay a scrape.
#include <sys/socket.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "cachemgr/client/client.h"
#include "cachemgr/service/share_channel.h"
#include "cachemgr/util/fd_passing.h"
#include "tests/support/daemon_process.h"
#include "tests/support/http_client.h"

namespace cachemgr::testing {
namespace {

client::AttachOptions SmallModel(const std::string& name) {
  client::AttachOptions options;
  options.client_name = name;
  options.model.name = "m";
  options.model.num_layers = 2;
  options.model.num_q_heads = 2;
  options.model.num_kv_heads = 1;
  options.model.head_dim = 8;
  options.num_blocks = 8;
  options.auto_heartbeat = false;
  return options;
}

// Connections that never send a request; their receives fail after 20 s instead of hanging.
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

TEST_CASE("idle share-socket peers do not delay a real client's Attach", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  // Before, the daemon gave each idle connection a 1 s timeout in turn: this Attach waited
  // 40 s, past the client's 30 s share-channel deadline, and failed.
  std::vector<UniqueFd> idle = ConnectIdle(socket + ".share", 40);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let the daemon accept them

  const auto start = std::chrono::steady_clock::now();
  auto session = client::Session::Attach(socket, SmallModel("behind-idle-peers"));
  const auto elapsed = std::chrono::steady_clock::now() - start;
  REQUIRE(session.ok());
  CHECK(elapsed < std::chrono::seconds(5));  // generous: an Attach takes milliseconds
  REQUIRE((*session)->Allocate("s", 20).ok());
}

TEST_CASE("a flood of idle share-socket peers is capped and logged; clients still attach",
          "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  std::vector<UniqueFd> idle = ConnectIdle(socket + ".share", kMaxShareConnections + 16);
  auto session = client::Session::Attach(socket, SmallModel("behind-a-flood"));
  REQUIRE(session.ok());
  // The oldest idle connection was closed to make room, with the reason.
  auto reply = ReceiveFdMessage(idle.front().get());
  REQUIRE(reply.ok());
  CHECK_THAT(reply->payload, Catch::StartsWith("ERR RESOURCE_EXHAUSTED "));
  CHECK_THAT((*daemon)->log_contents(),
             Catch::Contains("\"msg\":\"share channel: connection limit reached"));
  CHECK((*daemon)->running());
}

// The metrics port from the daemon's "cachemgrd serving" line (written just after it starts
// answering RPCs, so waited for).
int MetricsPort(DaemonProcess& daemon) {
  const std::regex port(R"("metrics_port":(\d+))");
  for (int i = 0; i < 200; ++i) {
    std::smatch m;
    const std::string log = daemon.log_contents();
    if (std::regex_search(log, m, port)) return std::stoi(m[1]);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  FAIL("no metrics_port in the daemon's log");
  return -1;
}

TEST_CASE("idle metrics-port peers do not delay a scrape", "[service]") {
  auto daemon = DaemonProcess::Start({"--metrics_address=127.0.0.1:0"});
  REQUIRE(daemon.ok());
  const int port = MetricsPort(**daemon);
  // Before, one thread served the port with a 1 s timeout per connection: this scrape waited
  // 20 s.
  std::vector<UniqueFd> idle;
  for (int i = 0; i < 20; ++i) {
    auto conn = ConnectLoopback(port);
    REQUIRE(conn.ok());
    idle.push_back(std::move(*conn));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let the daemon accept them

  const auto start = std::chrono::steady_clock::now();
  const absl::StatusOr<std::string> response = HttpRequest(port, "GET", "/metrics");
  const auto elapsed = std::chrono::steady_clock::now() - start;
  REQUIRE(response.ok());
  CHECK_THAT(*response, Catch::StartsWith("HTTP/1.1 200 OK\r\n"));
  CHECK_THAT(*response, Catch::Contains("\ncachemgr_clients 0\n"));
  CHECK(elapsed < std::chrono::seconds(5));  // generous: a scrape takes milliseconds

  // Idle connections hold nothing up at shutdown either.
  auto code = (*daemon)->Terminate(SIGTERM, absl::Seconds(10));
  REQUIRE(code.ok());
  CHECK(*code == 0);
}

}  // namespace
}  // namespace cachemgr::testing
