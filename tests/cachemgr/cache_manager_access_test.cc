// CacheManager's tenancy rules: sessions bound to the owner that attached them, pools never
// shared across owners, other owners' sequences invisible, operator rights only with the
// operator credential, client caps.
#include <catch2/catch.hpp>

#include "cachemgr/backend/host_backend.h"
#include "cachemgr/cache_manager.h"

namespace cachemgr {
namespace {

ModelSpec SmallModel(const std::string& name = "tiny") {
  ModelSpec m;
  m.name = name;
  m.num_layers = 2;
  m.num_q_heads = 2;
  m.num_kv_heads = 1;
  m.head_dim = 8;
  m.dtype = DType::kFp32;
  m.block_size = 4;
  return m;
}

// A Unix-socket caller of uid `uid`, with `token`.
Caller As(uid_t uid, std::string token = "") {
  Caller c(std::move(token));
  c.peer = PeerCredentials{100, uid, uid};
  return c;
}

Caller Operator(uid_t uid) {
  Caller c = As(uid);
  c.operator_credential = true;
  return c;
}

struct Fixture {
  explicit Fixture(CacheManagerOptions options = {})
      : manager(options, &backend, &clock, nullptr) {}

  AttachResult Attach(uid_t uid, const std::string& name = "engine",
                      ModelSpec model = SmallModel()) {
    auto r = manager.Attach({name, model, 16}, As(uid));
    REQUIRE(r.ok());
    return *r;
  }

  HostBackend backend;
  FakeClock clock;
  CacheManager manager;
};

TEST_CASE("a session token works only for the uid that attached it", "[cpu]") {
  Fixture f;
  const AttachResult alice = f.Attach(1000);
  REQUIRE(f.manager.Allocate(As(1000, alice.session_token), "a", 5).ok());
  f.clock.Advance(absl::Seconds(6));  // lease: 4 s left

  for (const auto& status :
       {f.manager.Heartbeat(As(2000, alice.session_token)).status(),
        f.manager.Allocate(As(2000, alice.session_token), "a", 1).status(),
        f.manager.Free(As(2000, alice.session_token), "a").status(),
        f.manager.GetSequence(As(2000, alice.session_token), "a", true).status(),
        f.manager.ShareFds(As(2000, alice.session_token)).status(),
        f.manager.Detach(As(2000, alice.session_token)).status(),
        // Over TCP (no peer) the token is no better.
        f.manager.Heartbeat(Caller(alice.session_token)).status()}) {
    CHECK(status.code() == absl::StatusCode::kPermissionDenied);
    CHECK_THAT(std::string(status.message()), Catch::Contains("attached by uid 1000"));
  }
  // The refused calls changed nothing (the operator's look renews no lease)...
  auto seq = f.manager.GetSequence(Operator(0), "a", false);
  REQUIRE(seq.ok());
  CHECK(seq->num_positions == 5);
  REQUIRE(f.manager.CheckInvariants().ok());
  // ...and did not renew the lease: 6 + 5 s after the last renewal it is over.
  f.clock.Advance(absl::Seconds(5));
  CHECK(f.manager.Heartbeat(As(1000, alice.session_token)).status().code() ==
        absl::StatusCode::kNotFound);
}

TEST_CASE("owners never share a pool, even for the same model", "[cpu]") {
  Fixture f;
  const AttachResult a1 = f.Attach(1000, "a1");
  const AttachResult a2 = f.Attach(1000, "a2");
  const AttachResult b = f.Attach(2000, "b");
  CHECK(a1.pool.pool_id == a2.pool.pool_id);
  CHECK(a1.pool.pool_id != b.pool.pool_id);
  // Another owner may even describe the model differently: it is not the same pool.
  ModelSpec other = SmallModel();
  other.head_dim = 16;
  CHECK(f.manager.Attach({"c", other, 8}, As(3000)).ok());
  CHECK(f.manager.Attach({"d", other, 8}, As(1000)).status().code() ==
        absl::StatusCode::kFailedPrecondition);
  CHECK(f.manager.Stats().pools.size() == 3);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("without the operator credential a caller sees only its own uid", "[cpu]") {
  Fixture f;
  const AttachResult alice = f.Attach(1000, "alice");
  const AttachResult bob = f.Attach(2000, "bob");
  REQUIRE(f.manager.Allocate(As(1000, alice.session_token), "alice-seq", 5).ok());
  REQUIRE(f.manager.Allocate(As(2000, bob.session_token), "bob-seq", 5).ok());

  // Bob, session-less: his own sequences, pools and clients only.
  auto list = f.manager.ListSequences(As(2000));
  REQUIRE(list.ok());
  REQUIRE(list->size() == 1);
  CHECK((*list)[0].sequence_id == "bob-seq");
  CHECK(f.manager.GetSequence(As(2000), "bob-seq", true).ok());
  auto hidden = f.manager.GetSequence(As(2000), "alice-seq", true);
  CHECK(hidden.status().code() == absl::StatusCode::kNotFound);
  CHECK_THAT(std::string(hidden.status().message()), Catch::Contains("does not exist"));
  // With his session: the same answer as for a sequence that does not exist.
  CHECK(f.manager.GetSequence(As(2000, bob.session_token), "alice-seq", false).status().code() ==
        absl::StatusCode::kNotFound);
  const StatsSnapshot bobs = f.manager.Stats(As(2000));
  REQUIRE(bobs.clients.size() == 1);
  CHECK(bobs.clients[0].client_name == "bob");
  REQUIRE(bobs.pools.size() == 1);
  CHECK(bobs.pools[0].pool_id == bob.pool.pool_id);
  CHECK(bobs.num_sequences == 1);
  // Operator actions need the credential, whatever the uid (root included).
  for (uid_t uid : {2000u, 1000u, 0u}) {
    CHECK(f.manager.Free(As(uid), "alice-seq").status().code() ==
          absl::StatusCode::kPermissionDenied);
  }
  // The operator sees and acts on everything.
  CHECK(f.manager.ListSequences(Operator(2000))->size() == 2);
  CHECK(f.manager.Stats(Operator(2000)).clients.size() == 2);
  CHECK(f.manager.GetSequence(Operator(2000), "alice-seq", true).ok());
  CHECK(f.manager.Free(Operator(2000), "alice-seq").ok());
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("client caps: total and per uid, RESOURCE_EXHAUSTED naming the flag", "[cpu]") {
  CacheManagerOptions options;
  options.max_clients = 5;
  options.max_clients_per_uid = 3;
  Fixture f(options);
  std::vector<AttachResult> alice;
  for (int i = 0; i < 3; ++i) alice.push_back(f.Attach(1000));
  auto over_uid = f.manager.Attach({"x", SmallModel(), 16}, As(1000));
  CHECK(over_uid.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(over_uid.status().message()),
             Catch::Contains("--max_clients_per_uid=3") && Catch::Contains("uid 1000"));
  f.Attach(2000);
  f.Attach(3000);
  auto over_total = f.manager.Attach({"y", SmallModel(), 16}, As(4000));
  CHECK(over_total.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(over_total.status().message()), Catch::Contains("--max_clients=5"));
  // A detach makes room again.
  REQUIRE(f.manager.Detach(As(1000, alice[0].session_token)).ok());
  CHECK(f.manager.Attach({"z", SmallModel(), 16}, As(4000)).ok());
  REQUIRE(f.manager.CheckInvariants().ok());
}

}  // namespace
}  // namespace cachemgr
