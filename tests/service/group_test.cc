// Tensor-parallel groups through the real daemon and the C++ client: two sessions attach as the
// ranks of one engine, each maps its shard of the KV heads, and both act on one block table.
#include <catch2/catch.hpp>

#include "cachemgr/client/client.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

client::AttachOptions RankOptions(uint32_t rank) {
  client::AttachOptions o;
  o.client_name = "rank" + std::to_string(rank);
  o.model.name = "tp-model";
  o.model.num_layers = 2;
  o.model.num_q_heads = 8;
  o.model.num_kv_heads = 4;
  o.model.head_dim = 16;
  o.model.dtype = client::DType::kFp16;
  o.model.block_size = 16;
  o.num_blocks = 32;
  o.group_name = "engine-a";
  o.group_rank = rank;
  o.group_size = 2;
  return o;
}

TEST_CASE("A group's ranks map their shards and share one block table", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  auto r0 = client::Session::Attach((*daemon)->socket_path(), RankOptions(0));
  auto r1 = client::Session::Attach((*daemon)->socket_path(), RankOptions(1));
  REQUIRE(r0.ok());
  REQUIRE(r1.ok());
  for (auto* s : {&**r0, &**r1}) {
    CHECK(s->group_size() == 2);
    CHECK(s->model().num_kv_heads == 2);  // its shard
    CHECK(s->model().num_q_heads == 4);
    CHECK(s->input_buffer().size() == size_t{2} * 64 * 4 * 16);
    CHECK(s->pool_id() == (*r0)->pool_id());
  }
  CHECK((*r0)->group_rank() == 0);
  CHECK((*r1)->group_rank() == 1);

  auto a = (*r0)->Allocate("seq", 20);
  REQUIRE(a.ok());
  auto b = (*r1)->Allocate("seq", 20);  // rank 1 grows rank 0's sequence
  REQUIRE(b.ok());
  CHECK(b->first_position == 20);
  auto seen = (*r1)->GetSequence("seq", false);
  REQUIRE(seen.ok());
  CHECK(seen->num_positions == 40);
  CHECK(seen->layers[0].block_ids.size() == 3);

  // The same rank twice: refused, naming the field.
  auto again = client::Session::Attach((*daemon)->socket_path(), RankOptions(1));
  CHECK(again.status().code() == absl::StatusCode::kAlreadyExists);
  CHECK(again.status().message().find("group.rank 1") != std::string::npos);

  auto stub = RawStub((*daemon)->socket_path());
  grpc::ClientContext ctx;
  AddOperatorCredential(ctx, (*daemon)->socket_path());
  v1::StatsResponse stats;
  REQUIRE(stub->Stats(&ctx, v1::StatsRequest(), &stats).ok());
  REQUIRE(stats.pools_size() == 1);
  CHECK(stats.pools(0).group_name() == "engine-a");
  CHECK(stats.pools(0).group_size() == 2);
  CHECK(stats.pools(0).group_ranks_attached() == 2);
  CHECK(stats.pools(0).layers(0).used_blocks() == 3);
  CHECK(AccountingBalances(*stub));

  REQUIRE((*r1)->Free("seq").ok());
  CHECK(UsedBlocks(*stub) == 0);
}

}  // namespace
}  // namespace cachemgr::testing
