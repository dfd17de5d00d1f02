// The real cachemgrd against peers that connect and say nothing: idle connections to the share
// socket must not delay a real client's Attach (which fetches the pool's descriptors there),
// and a flood of them is capped with a warning in the log.
#include <sys/socket.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "cachemgr/client/client.h"
#include "cachemgr/service/share_channel.h"
#include "cachemgr/util/fd_passing.h"
#include "tests/support/daemon_process.h"

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

}  // namespace
}  // namespace cachemgr::testing
