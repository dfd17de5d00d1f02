// A stalled engine must not corrupt another tenant's KV (issue 12, finding 3). Client A (the
// kv_client tool, a separate process) writes its sequence and is SIGSTOPped past its lease; the
// daemon expires it. Client B then takes every block that is free and writes its own KV. A is
// SIGCONTed and writes through its stale mapping into the blocks it held, as a resumed engine
// would before it notices its lease is gone. The daemon's quarantine kept A's blocks from B, so
// B's KV digest is unchanged.
#include <signal.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <random>
#include <string>

#include "cachemgr/client/client.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

// Layer 0's occupancy of the only pool.
v1::LayerOccupancy Layer0(v1::CacheManager::Stub& stub) {
  grpc::ClientContext ctx;
  v1::StatsResponse resp;
  REQUIRE(stub.Stats(&ctx, v1::StatsRequest(), &resp).ok());
  REQUIRE(resp.pools_size() == 1);
  return resp.pools(0).layers(0);
}

int Clients(v1::CacheManager::Stub& stub) {
  grpc::ClientContext ctx;
  v1::StatsResponse resp;
  if (!stub.Stats(&ctx, v1::StatsRequest(), &resp).ok()) return -1;
  return resp.clients_size();
}

TEST_CASE("a client stalled past its lease cannot overwrite the next owner's KV", "[service]") {
  auto daemon = DaemonProcess::Start(
      {"--heartbeat_interval_ms=200", "--lease_timeout_ms=2000", "--quarantine_ms=120000"});
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  auto stub = RawStub(socket);

  // B first, so the pool outlives A.
  client::AttachOptions options;
  options.client_name = "b";
  options.model.name = "shared";
  options.model.num_layers = 2;
  options.model.num_q_heads = 2;
  options.model.num_kv_heads = 2;
  options.model.head_dim = 8;
  options.model.dtype = client::DType::kFp32;
  options.model.block_size = 16;
  options.num_blocks = 16;
  auto b = client::Session::Attach(socket, options);
  REQUIRE(b.ok());

  auto a = ChildProcess::Spawn(
      KvClientPath(),
      {"--socket=" + socket, "--model=shared", "--name=a", "--layers=2", "--q_heads=2",
       "--kv_heads=2", "--head_dim=8", "--dtype=fp32", "--block_size=16", "--num_blocks=16",
       "--tokens=100", "--rewrite_on_signal"});
  REQUIRE(a.ok());
  auto written = (*a)->ReadLine(absl::Seconds(30));
  REQUIRE(written.ok());
  REQUIRE_THAT(*written, Catch::Contains("\"used_blocks\":14"));  // 7 blocks in each layer

  // A stalls; its lease runs out and the daemon reclaims what it held.
  REQUIRE((*a)->Kill(SIGSTOP).ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (Clients(*stub) != 1 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(50));
  REQUIRE(Clients(*stub) == 1);
  const v1::LayerOccupancy reclaimed = Layer0(*stub);
  CHECK(reclaimed.quarantined_blocks() == 7);
  CHECK(reclaimed.free_blocks() + reclaimed.used_blocks() + reclaimed.quarantined_blocks() ==
        reclaimed.capacity_blocks());
  CHECK(AccountingBalances(*stub));

  // B takes every block that is free and writes its KV.
  const uint32_t tokens = reclaimed.free_blocks() * 16;
  REQUIRE(tokens > 0);
  auto alloc = (*b)->Allocate("b-seq", tokens);
  REQUIRE(alloc.ok());
  std::mt19937 rng(7);
  for (const client::LayerAllocation& layer : alloc->layers) {
    for (int64_t slot : layer.slot_mapping) {
      float* k = (*b)->pool().key_at_slot<float>(layer.layer, slot);
      float* v = (*b)->pool().value_at_slot<float>(layer.layer, slot);
      for (uint32_t i = 0; i < 2 * 8; ++i) {
        k[i] = static_cast<float>(rng() % 1000);
        v[i] = static_cast<float>(rng() % 1000);
      }
    }
  }
  auto before = (*b)->GetSequence("b-seq", /*include_kv_digest=*/true);
  REQUIRE(before.ok());

  // A resumes and writes through its stale mapping into the blocks it held.
  REQUIRE((*a)->Kill(SIGCONT).ok());
  REQUIRE((*a)->Kill(SIGUSR1).ok());
  auto rewrote = (*a)->ReadLine(absl::Seconds(30));
  REQUIRE(rewrote.ok());
  CHECK(*rewrote == "{\"rewrote\":100}");

  auto after = (*b)->GetSequence("b-seq", /*include_kv_digest=*/true);
  REQUIRE(after.ok());
  REQUIRE(after->layers.size() == before->layers.size());
  for (size_t l = 0; l < after->layers.size(); ++l) {
    INFO("layer " << l);
    CHECK(after->layers[l].kv_digest == before->layers[l].kv_digest);
  }
  CHECK(AccountingBalances(*stub));
  REQUIRE((*b)->Detach().ok());
}

}  // namespace
}  // namespace cachemgr::testing
