// Floods and a listener that cannot serve (issue 12, finding 4): an attach flood meets the
// client caps with RESOURCE_EXHAUSTED while everyone else is served; a daemon whose descriptors
// run out stops serving new connections, says so in its health, and serves again once
// descriptors are free; a broken socket turns health NOT_SERVING (and, with
// --exit_when_unserving, ends the daemon so its supervisor restarts it).
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cachemgr/client/client.h"
#include "cachemgr/util/unique_fd.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;
constexpr absl::Duration kPatience = absl::Seconds(60);

// A channel with a connection of its own (not shared with other channels to the same target).
std::shared_ptr<grpc::Channel> OwnChannel(const std::string& target) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

// The daemon's overall health over `channel`; UNKNOWN when the call fails.
ServingStatus Health(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  grpc::health::v1::HealthCheckResponse resp;
  if (!stub->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &resp).ok()) {
    return grpc::health::v1::HealthCheckResponse::UNKNOWN;
  }
  return resp.status();
}

// Polls `channel` until the health is `want` or `kPatience` passed.
bool HealthBecomes(const std::shared_ptr<grpc::Channel>& channel, ServingStatus want) {
  const absl::Time deadline = absl::Now() + kPatience;
  while (absl::Now() < deadline) {
    if (Health(channel) == want) return true;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return false;
}

v1::AttachRequest FloodAttach(const std::string& name) {
  v1::AttachRequest req;
  req.set_client_name(name);
  *req.mutable_model() = StoriesModel("flood");
  req.set_num_blocks(4);
  req.set_input_buffer_bytes(4096);
  return req;
}

grpc::Status Attach(v1::CacheManager::Stub& stub, const std::string& name,
                    v1::AttachResponse* resp) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  return stub.Attach(&ctx, FloodAttach(name), resp);
}

// A raw connection to the Unix socket at `path` that never speaks (-1 if connect fails).
UniqueFd Connect(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return {};
  return fd;
}

TEST_CASE(
    "an attach flood meets --max_clients; others are served throughout; detaches free "
    "room",
    "[service]") {
  constexpr int kCap = 1000, kFlood = 1100;
  auto daemon = DaemonProcess::Start(
      {absl::StrCat("--max_clients=", kCap), absl::StrCat("--max_clients_per_uid=", kCap),
       "--lease_timeout_ms=600000", "--health_probe_interval_ms=200"});
  REQUIRE(daemon.ok());
  const std::string target = "unix:" + (*daemon)->socket_path();
  auto flood = v1::CacheManager::NewStub(OwnChannel(target));
  auto bystander = OwnChannel(target);
  auto bystander_stub = v1::CacheManager::NewStub(bystander);

  std::vector<std::string> tokens;
  int exhausted = 0;
  for (int i = 0; i < kFlood; ++i) {
    v1::AttachResponse resp;
    const grpc::Status status = Attach(*flood, absl::StrCat("flood-", i), &resp);
    if (status.ok()) {
      tokens.push_back(resp.session_token());
    } else {
      INFO(status.error_message());
      REQUIRE(status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
      CHECK_THAT(status.error_message(), Catch::Contains(absl::StrCat("--max_clients=", kCap)));
      ++exhausted;
    }
    if (i % 100 == 99) {
      // Someone else is served all along: health, and stats over another connection.
      CHECK(Health(bystander) == grpc::health::v1::HealthCheckResponse::SERVING);
      grpc::ClientContext ctx;
      v1::StatsResponse stats;
      CHECK(bystander_stub->Stats(&ctx, v1::StatsRequest(), &stats).ok());
    }
  }
  CHECK(tokens.size() == kCap);
  CHECK(exhausted == kFlood - kCap);

  // Detaching makes room for exactly as many, through the full client (share channel, mapping).
  for (int i = 0; i < 10; ++i) {
    grpc::ClientContext ctx;
    v1::DetachRequest req;
    req.set_session_token(tokens[i]);
    v1::DetachResponse resp;
    REQUIRE(flood->Detach(&ctx, req, &resp).ok());
  }
  client::AttachOptions options;
  options.client_name = "after-the-flood";
  options.model.name = "quiet";
  options.model.num_layers = 2;
  options.model.num_q_heads = 2;
  options.model.num_kv_heads = 1;
  options.model.head_dim = 8;
  options.num_blocks = 8;
  options.auto_heartbeat = false;
  auto session = client::Session::Attach((*daemon)->socket_path(), options);
  REQUIRE(session.ok());
  CHECK((*session)->Allocate("s", 10).ok());
  for (int i = 0; i < 9; ++i) {
    v1::AttachResponse resp;
    CHECK(Attach(*flood, absl::StrCat("refill-", i), &resp).ok());
  }
  v1::AttachResponse resp;
  CHECK(Attach(*flood, "one-too-many", &resp).error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
  CHECK(Health(bystander) == grpc::health::v1::HealthCheckResponse::SERVING);
  CHECK_THAT((*daemon)->log_contents(), !Catch::Contains("cannot serve new clients"));
}

TEST_CASE("--max_clients_per_uid keeps one uid from taking every slot", "[service]") {
  auto daemon = DaemonProcess::Start({"--max_clients=20", "--max_clients_per_uid=5"});
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  for (int i = 0; i < 5; ++i) {
    v1::AttachResponse resp;
    REQUIRE(Attach(*stub, absl::StrCat("c", i), &resp).ok());
  }
  v1::AttachResponse resp;
  const grpc::Status over = Attach(*stub, "c5", &resp);
  CHECK(over.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
  CHECK_THAT(over.error_message(),
             Catch::Contains("--max_clients_per_uid=5") && Catch::Contains("uid 0"));
}

TEST_CASE(
    "descriptors run out: health turns NOT_SERVING, and the daemon serves again once "
    "they are free",
    "[service]") {
  // A low limit the client caps fit under but connections do not (the daemon warns about it).
  SpawnOptions spawn;
  spawn.nofile_limit = 128;
  auto daemon = DaemonProcess::Start(
      {"--max_clients=16", "--max_connections=1000", "--max_connections_per_uid=1000",
       "--health_probe_interval_ms=100", "--health_probe_failures=2"},
      spawn);
  INFO(daemon.status().ToString());
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  CHECK_THAT((*daemon)->log_contents(), Catch::Contains("cannot hold --max_connections"));
  // A connection made before the flood, to watch health through.
  auto watcher = OwnChannel("unix:" + socket);
  REQUIRE(Health(watcher) == grpc::health::v1::HealthCheckResponse::SERVING);

  // Silent connections until the daemon has no descriptor left for the next one.
  std::vector<UniqueFd> flood;
  for (int i = 0; i < 300; ++i) {
    UniqueFd fd = Connect(socket);
    if (!fd.valid()) break;  // the backlog is full too
    flood.push_back(std::move(fd));
  }
  REQUIRE(flood.size() > 128);
  CHECK(HealthBecomes(watcher, grpc::health::v1::HealthCheckResponse::NOT_SERVING));
  CHECK_THAT((*daemon)->log_contents(),
             Catch::Contains("accept failed; retrying") &&
                 Catch::Contains("cannot serve new clients: the health probe failed"));
  // A client arriving now waits in the backlog...
  auto late = v1::CacheManager::NewStub(OwnChannel("unix:" + socket));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  ctx.set_wait_for_ready(true);
  const v1::AttachRequest late_request = FloodAttach("late");
  v1::AttachResponse attached;
  grpc::Status late_status;
  std::atomic<bool> late_done{false};
  late->async()->Attach(&ctx, &late_request, &attached, [&](grpc::Status s) {
    late_status = std::move(s);
    late_done.store(true);
  });

  // ...and is served once the flood's connections close.
  flood.clear();
  CHECK(HealthBecomes(watcher, grpc::health::v1::HealthCheckResponse::SERVING));
  const absl::Time deadline = absl::Now() + kPatience;
  while (!late_done.load() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(20));
  const bool served_in_time = late_done.load();
  if (!served_in_time) ctx.TryCancel();
  while (!late_done.load()) absl::SleepFor(absl::Milliseconds(20));
  CHECK(served_in_time);
  CHECK(late_status.ok());
  CHECK_THAT((*daemon)->log_contents(), Catch::Contains("serving again"));
  CHECK((*daemon)->running());
}

TEST_CASE("connections over --max_connections_per_uid are closed at accept", "[service]") {
  auto daemon = DaemonProcess::Start({"--max_connections_per_uid=4"});
  REQUIRE(daemon.ok());
  const std::string target = "unix:" + (*daemon)->socket_path();
  std::vector<std::shared_ptr<grpc::Channel>> held;
  for (int i = 0; i < 4; ++i) {
    held.push_back(OwnChannel(target));
    REQUIRE(Health(held.back()) == grpc::health::v1::HealthCheckResponse::SERVING);
  }
  // The fifth connection of this uid is closed as soon as it is accepted.
  CHECK(Health(OwnChannel(target)) == grpc::health::v1::HealthCheckResponse::UNKNOWN);
  CHECK_THAT((*daemon)->log_contents(), Catch::Contains("--max_connections_per_uid=4"));
  // The held ones still work; once one closes, a new one gets in.
  CHECK(Health(held.front()) == grpc::health::v1::HealthCheckResponse::SERVING);
  held.erase(held.begin());
  bool admitted = false;
  const absl::Time deadline = absl::Now() + kPatience;
  while (!admitted && absl::Now() < deadline) {
    admitted = Health(OwnChannel(target)) == grpc::health::v1::HealthCheckResponse::SERVING;
    if (!admitted) absl::SleepFor(absl::Milliseconds(50));
  }
  CHECK(admitted);
}

TEST_CASE("a broken socket turns health NOT_SERVING, and back when it is restored", "[service]") {
  auto daemon =
      DaemonProcess::Start({"--health_probe_interval_ms=100", "--health_probe_failures=2"});
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  const std::string moved = (*daemon)->dir() + "/moved.sock";
  auto watcher = OwnChannel("unix:" + socket);
  REQUIRE(Health(watcher) == grpc::health::v1::HealthCheckResponse::SERVING);
  // New clients cannot find the socket any more.
  REQUIRE(::rename(socket.c_str(), moved.c_str()) == 0);
  CHECK(HealthBecomes(watcher, grpc::health::v1::HealthCheckResponse::NOT_SERVING));
  CHECK(Health(OwnChannel("unix:" + moved)) == grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  REQUIRE(::rename(moved.c_str(), socket.c_str()) == 0);
  CHECK(HealthBecomes(watcher, grpc::health::v1::HealthCheckResponse::SERVING));
  CHECK((*daemon)->running());
}

TEST_CASE("--exit_when_unserving: a daemon that cannot serve exits non-zero", "[service]") {
  auto daemon = DaemonProcess::Start(
      {"--health_probe_interval_ms=100", "--health_probe_failures=2", "--exit_when_unserving"});
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  REQUIRE(::unlink(socket.c_str()) == 0);
  const absl::Time deadline = absl::Now() + kPatience;
  while ((*daemon)->running() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(50));
  auto code = (*daemon)->Terminate(SIGKILL, absl::Seconds(1));  // reaped already: its status
  REQUIRE(code.ok());
  CHECK(*code == 3);
  const std::string log = (*daemon)->log_contents();
  CHECK_THAT(log, Catch::Contains("cannot serve new clients") &&
                      Catch::Contains("\"exiting\":\"true\"") &&
                      Catch::Contains("cachemgrd stopped"));
}

}  // namespace
}  // namespace cachemgr::testing
