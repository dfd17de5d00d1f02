#include "cachemgr/peers/peer_directory.h"

#include <catch2/catch.hpp>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cachemgr/service/peer_service.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "prometheus/metric_family.h"

namespace cachemgr {
namespace {

// A daemon's Peer service on a loopback port.
struct PeerServer {
  explicit PeerServer(const std::string& boot_id) : service(boot_id, "v-test", "node-" + boot_id) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    server = builder.BuildAndStart();
  }
  std::string address() const { return absl::StrCat("127.0.0.1:", port); }
  PeerService service;
  int port = 0;
  std::unique_ptr<grpc::Server> server;
};

PeerDirectoryOptions Options(const std::vector<std::string>& addresses) {
  PeerDirectoryOptions options;
  for (const std::string& a : addresses) {
    auto parsed = ParsePeerList(a);
    REQUIRE(parsed.ok());
    options.sources.push_back(parsed->front());
  }
  options.boot_id = "me";
  options.node_name = "node-me";
  options.probe_interval = absl::Milliseconds(50);
  options.probe_deadline = absl::Milliseconds(500);
  options.credentials = grpc::InsecureChannelCredentials();
  return options;
}

// Waits until `done` holds for the directory's snapshot (fails after 10 s).
template <typename Pred>
std::vector<PeerSnapshot> WaitFor(const PeerDirectory& directory, Pred done) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  std::vector<PeerSnapshot> peers = directory.Snapshot();
  while (!done(peers) && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
    peers = directory.Snapshot();
  }
  REQUIRE(done(peers));
  return peers;
}

const PeerSnapshot* Find(const std::vector<PeerSnapshot>& peers, const std::string& address) {
  for (const PeerSnapshot& p : peers) {
    if (p.address == address) return &p;
  }
  return nullptr;
}

TEST_CASE("probes find peers up, down and this daemon itself", "[cpu]") {
  PeerServer other("other");
  PeerServer self("me");  // answers with this daemon's boot id
  PeerServer dead("dead");
  REQUIRE(dead.server != nullptr);
  const std::string dead_address = dead.address();
  dead.server->Shutdown();
  PeerDirectory directory(Options({other.address(), self.address(), dead_address}));
  const std::vector<PeerSnapshot> peers =
      WaitFor(directory, [&](const std::vector<PeerSnapshot>& peers) {
        const PeerSnapshot* d = Find(peers, dead_address);
        const PeerSnapshot* o = Find(peers, other.address());
        const PeerSnapshot* s = Find(peers, self.address());
        return d != nullptr && o != nullptr && s != nullptr && d->state == PeerState::kDown &&
               o->state == PeerState::kUp && s->state == PeerState::kSelf;
      });
  const PeerSnapshot* o = Find(peers, other.address());
  CHECK(o->boot_id == "other");
  CHECK(o->node_name == "node-other");
  CHECK(o->version == "v-test");
  CHECK(o->probes_ok >= 1);
  CHECK(o->rtt > absl::ZeroDuration());
  CHECK(o->last_error.empty());
  const PeerSnapshot* d = Find(peers, dead_address);
  CHECK(d->probes_ok == 0);
  CHECK(d->probes_failed >= 1);
  CHECK_THAT(d->last_error, Catch::StartsWith("UNAVAILABLE"));
  CHECK(d->last_seen == absl::InfinitePast());

  // The metrics leave this daemon out and count every probe.
  const auto families = directory.collectable()->Collect();
  REQUIRE(families.size() == 3);
  CHECK(families[0].name == "cachemgr_peer_up");
  REQUIRE(families[0].metric.size() == 2);
  for (const auto& m : families[0].metric) {
    const std::string& peer = m.label.at(0).value;
    CHECK(peer != self.address());
    CHECK(m.gauge.value == (peer == other.address() ? 1 : 0));
  }
  CHECK(families[2].metric.size() == 4);  // ok and failed, per peer
}

TEST_CASE("a peer that goes away turns down and comes back up", "[cpu]") {
  auto other = std::make_unique<PeerServer>("first");
  const int port = other->port;
  const std::string address = other->address();
  PeerDirectory directory(Options({address}));
  WaitFor(directory, [&](const std::vector<PeerSnapshot>& peers) {
    return peers.size() == 1 && peers[0].state == PeerState::kUp;
  });
  other.reset();
  WaitFor(directory, [&](const std::vector<PeerSnapshot>& peers) {
    return peers.size() == 1 && peers[0].state == PeerState::kDown;
  });
  // Back on the same port under a new boot id.
  PeerService service("second", "v-test", "node-second");
  grpc::ServerBuilder builder;
  int bound = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &bound);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> again = builder.BuildAndStart();
  REQUIRE(bound == port);
  const auto peers = WaitFor(directory, [&](const std::vector<PeerSnapshot>& peers) {
    return peers.size() == 1 && peers[0].state == PeerState::kUp && peers[0].boot_id == "second";
  });
  CHECK(peers[0].last_error.empty());
  CHECK(peers[0].probes_failed >= 1);
}

TEST_CASE("a directory without peers starts no prober and lists nothing", "[cpu]") {
  PeerDirectoryOptions options;
  options.boot_id = "me";
  PeerDirectory directory(std::move(options));
  CHECK(directory.Snapshot().empty());
  CHECK(directory.collectable()->Collect().at(0).metric.empty());
}

}  // namespace
}  // namespace cachemgr
