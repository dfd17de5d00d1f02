// A stalled writer must not corrupt another tenant's KV (issue 12, finding 3), whatever its
// client library does: this is the daemon's half of the defence. Client A is a raw client with no
// lease watchdog (raw gRPC calls, the pool mapped by hand from the share channel, no heartbeats:
// an engine whose client library never stops writing, or one stalled past its lease). The daemon
// expires A; client B then takes every block that is free and writes its own KV; A writes
// through its mapping into the blocks it held, as a resumed engine would. The daemon's
// quarantine kept A's blocks from B, so B's KV digest is unchanged. (The project's own clients
// also revoke their mapping when the lease lapses: tests/service/sidecar_restart_test.cc.)
#include <catch2/catch.hpp>
#include <random>
#include <string>
#include <vector>

#include "cachemgr/client/client.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/kernels/kv_layout.h"
#include "cachemgr/service/share_channel.h"
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

  // A: attached by hand, its pool mapped by hand, never heartbeating.
  v1::AttachRequest attach;
  attach.set_client_name("a");
  *attach.mutable_model() = StoriesModel("shared");
  attach.mutable_model()->set_num_layers(2);
  attach.mutable_model()->set_num_q_heads(2);
  attach.mutable_model()->set_num_kv_heads(2);
  attach.mutable_model()->set_head_dim(8);
  attach.set_num_blocks(16);
  v1::AttachResponse attached;
  {
    grpc::ClientContext ctx;
    REQUIRE(stub->Attach(&ctx, attach, &attached).ok());
  }
  auto fds = FetchSharedFds(attached.pool().share_socket_path(), attached.session_token());
  REQUIRE(fds.ok());
  REQUIRE(fds->size() == 2);  // the pool's region, then the input buffer
  auto region = MemfdRegion::Map(std::move((*fds)[0]), attached.pool().regions(0).bytes());
  REQUIRE(region.ok());
  kernels::KvLayerLayout layout;
  layout.num_blocks = 16;
  layout.block_size = 16;
  layout.num_kv_heads = 2;
  layout.head_dim = 8;
  layout.elem_bytes = 4;
  v1::AllocateRequest allocate;
  allocate.set_session_token(attached.session_token());
  allocate.set_sequence_id("a-seq");
  allocate.set_num_new_tokens(100);
  v1::AllocateResponse a_alloc;
  {
    grpc::ClientContext ctx;
    REQUIRE(stub->Allocate(&ctx, allocate, &a_alloc).ok());
  }
  REQUIRE(a_alloc.layers_size() == 2);
  // Writes every row A was given, in every layer, with `value`.
  auto a_writes = [&](float value) {
    for (const v1::LayerAllocation& layer : a_alloc.layers()) {
      std::byte* base = region->data() + attached.pool().layers(layer.layer()).offset();
      for (int64_t slot : layer.slot_mapping()) {
        for (kernels::KvPlane plane : {kernels::KvPlane::kKey, kernels::KvPlane::kValue}) {
          auto* row = reinterpret_cast<float*>(base + layout.slot_offset(plane, slot));
          for (uint32_t i = 0; i < 2 * 8; ++i) row[i] = value;
        }
      }
    }
  };
  a_writes(1.0f);
  CHECK(UsedBlocks(*stub) == 14);  // 7 blocks in each layer

  // A's lease runs out (it stalled) and the daemon reclaims what it held.
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
  a_writes(-7.0f);

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
