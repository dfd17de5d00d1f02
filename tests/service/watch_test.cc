// Watch streams the daemon's events, filtered by type, as another client acts.
#include <catch2/catch.hpp>
#include <thread>

#include "cachemgr/client/client.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

client::AttachOptions Options(const std::string& name) {
  client::AttachOptions o;
  o.client_name = name;
  o.model.name = "watched";
  o.model.num_layers = 2;
  o.model.num_q_heads = 4;
  o.model.num_kv_heads = 2;
  o.model.head_dim = 8;
  o.num_blocks = 16;
  o.auto_heartbeat = false;
  return o;
}

TEST_CASE("watch sees attach, allocate, fork, free and detach in order", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  grpc::ClientContext ctx;
  AddOperatorCredential(ctx, (*daemon)->socket_path());
  auto reader = stub->Watch(&ctx, v1::WatchRequest());
  // The stream is registered once the daemon has the call; give it a moment by making a call
  // on the same channel afterwards (calls on one channel are handled in order of arrival).
  absl::SleepFor(absl::Milliseconds(200));

  auto session = client::Session::Attach((*daemon)->socket_path(), Options("w"));
  REQUIRE(session.ok());
  REQUIRE((*session)->Allocate("s", 3).ok());
  REQUIRE((*session)->Fork("s", "t").ok());
  REQUIRE((*session)->Free("s").ok());
  REQUIRE((*session)->Detach().ok());

  std::vector<v1::EventType> types;
  v1::Event e;
  uint64_t last_seq = 0;
  while (types.size() < 7 && reader->Read(&e)) {
    types.push_back(e.type());
    CHECK(e.seq() > last_seq);
    last_seq = e.seq();
    if (e.type() == v1::EVENT_TYPE_SEQUENCE_FORKED) CHECK(e.sequence_id() == "t");
  }
  CHECK(types ==
        std::vector<v1::EventType>{v1::EVENT_TYPE_POOL_CREATED, v1::EVENT_TYPE_CLIENT_ATTACHED,
                                   v1::EVENT_TYPE_SEQUENCE_ALLOCATED,
                                   v1::EVENT_TYPE_SEQUENCE_FORKED, v1::EVENT_TYPE_SEQUENCE_FREED,
                                   v1::EVENT_TYPE_CLIENT_DETACHED, v1::EVENT_TYPE_POOL_RELEASED});
  ctx.TryCancel();
  reader->Finish();
}

TEST_CASE("watch needs the operator credential", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  grpc::ClientContext ctx;
  auto reader = stub->Watch(&ctx, v1::WatchRequest());
  v1::Event e;
  CHECK_FALSE(reader->Read(&e));
  const grpc::Status status = reader->Finish();
  CHECK(status.error_code() == grpc::StatusCode::PERMISSION_DENIED);
  CHECK_THAT(status.error_message(), Catch::Contains("operator credential"));
}

TEST_CASE("watch filters by type and ends cleanly at daemon shutdown", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  grpc::ClientContext ctx;
  AddOperatorCredential(ctx, (*daemon)->socket_path());
  v1::WatchRequest req;
  req.add_types(v1::EVENT_TYPE_SEQUENCE_FREED);
  auto reader = stub->Watch(&ctx, req);
  absl::SleepFor(absl::Milliseconds(200));
  {
    auto session = client::Session::Attach((*daemon)->socket_path(), Options("f"));
    REQUIRE(session.ok());
    REQUIRE((*session)->Allocate("a", 1).ok());
    REQUIRE((*session)->Allocate("b", 1).ok());
    REQUIRE((*session)->Free("b").ok());
  }
  v1::Event e;
  REQUIRE(reader->Read(&e));
  CHECK(e.type() == v1::EVENT_TYPE_SEQUENCE_FREED);
  CHECK(e.sequence_id() == "b");
  // Catch2's assertions are not thread-safe: the stopper only records the exit code.
  int exit_code = -1;
  std::thread stopper([&] { exit_code = (*daemon)->Terminate(SIGTERM).value_or(-1); });
  // Detaching "a" on session end produced no freed event (detach is its own type), so the next
  // thing the stream sees is its end.
  CHECK_FALSE(reader->Read(&e));
  CHECK(reader->Finish().ok());
  stopper.join();
  CHECK(exit_code == 0);
}

}  // namespace
}  // namespace cachemgr::testing
