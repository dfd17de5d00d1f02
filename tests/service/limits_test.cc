// The real daemon against hostile sizes (issue 12, findings 1, 2, 6 and 10): an Attach whose
// products overflow, pools crafted to pass the budget, an Allocate whose reply would be 100 MB,
// and megabyte strings in fields that error messages quote. Each gets a precise status, holds
// nothing afterwards, and the daemon keeps serving everyone else.
#include <catch2/catch.hpp>
#include <string>

#include "cachemgr/client/client.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

v1::ModelSpec Model(const std::string& name, uint32_t layers, uint32_t heads, uint32_t head_dim,
                    v1::DType dtype, uint32_t block_size) {
  v1::ModelSpec m;
  m.set_name(name);
  m.set_num_layers(layers);
  m.set_num_q_heads(heads);
  m.set_num_kv_heads(heads);
  m.set_head_dim(head_dim);
  m.set_dtype(dtype);
  m.set_block_size(block_size);
  m.set_layout(v1::CACHE_LAYOUT_FLASH_ATTN);
  m.mutable_rope()->set_style(v1::ROPE_STYLE_INTERLEAVED);
  m.mutable_rope()->set_theta(10000);
  return m;
}

// With a 4 KiB input buffer: the default (64 queries of every layer) of the huge models below
// is refused by itself.
grpc::Status Attach(v1::CacheManager::Stub& stub, const v1::ModelSpec& model, uint32_t num_blocks,
                    v1::AttachResponse* resp) {
  grpc::ClientContext ctx;
  v1::AttachRequest req;
  req.set_client_name("probe");
  *req.mutable_model() = model;
  req.set_num_blocks(num_blocks);
  req.set_input_buffer_bytes(4096);
  return stub.Attach(&ctx, req, resp);
}

v1::StatsResponse Stats(v1::CacheManager::Stub& stub) {
  grpc::ClientContext ctx;
  v1::StatsResponse resp;
  REQUIRE(stub.Stats(&ctx, v1::StatsRequest(), &resp).ok());
  return resp;
}

// An ordinary client: attach, allocate, write through the mapping, and the daemon's digest of
// the KV matches (the call that crashed the daemon in the issue).
void CheckAnotherClientIsServed(const std::string& socket) {
  auto client = ChildProcess::Spawn(KvClientPath(), {"--socket=" + socket, "--model=ordinary"});
  REQUIRE(client.ok());
  auto line = (*client)->ReadLine(absl::Seconds(30));
  REQUIRE(line.ok());
  CHECK_THAT(*line, Catch::Contains("\"daemon_digests\":["));
  CHECK_THAT(*line, !Catch::Contains("error"));
  const size_t local = line->find("\"local_digests\":[");
  const size_t daemon = line->find("\"daemon_digests\":[");
  REQUIRE(local != std::string::npos);
  CHECK(line->substr(local + 17, daemon - local - 19) ==
        line->substr(daemon + 18, line->find(']', daemon) - daemon - 18));
  auto code = (*client)->Wait(absl::Seconds(30));
  REQUIRE(code.ok());
  CHECK(*code == 0);
}

TEST_CASE("the Attach that crashed the daemon gets a precise error; everyone else is served",
          "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  v1::AttachResponse resp;
  const grpc::Status s =
      Attach(*stub, Model("wrap", 290, 4013, 1018, v1::DTYPE_FP32, 1013), 1921345, &resp);
  REQUIRE(s.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK_THAT(s.error_message(), Catch::StartsWith("num_blocks 1921345"));
  CHECK(Stats(*stub).pools_size() == 0);
  CHECK((*daemon)->running());
  CheckAnotherClientIsServed((*daemon)->socket_path());
  CHECK((*daemon)->running());
  CHECK(AccountingBalances(*stub));
}

TEST_CASE("a pool crafted around page rounding cannot pass the budget", "[service]") {
  auto daemon = DaemonProcess::Start({"--memory_budget=1G"});
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  v1::AttachResponse resp;
  grpc::Status s = Attach(*stub, Model("tiny", 3, 1, 2, v1::DTYPE_FP16, 16), 2796202, &resp);
  REQUIRE(s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
  CHECK_THAT(s.error_message(), Catch::StartsWith("num_blocks 2796202 needs"));
  // What is left cannot have wrapped into room for 16 or 64 GiB.
  for (const uint32_t gib : {16u, 64u}) {
    // 1 layer of 8 heads of 128 dims in fp16, 16 tokens a block: 64 KiB a block.
    s = Attach(*stub, Model("big" + std::to_string(gib), 1, 8, 128, v1::DTYPE_FP16, 16),
               gib * 16384, &resp);
    INFO(gib << " GiB");
    CHECK(s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
  }
  // A pool that fits is charged with its bookkeeping, and usage never passes the budget.
  REQUIRE(Attach(*stub, Model("tiny", 3, 1, 2, v1::DTYPE_FP16, 16), 0, &resp).ok());
  const v1::StatsResponse stats = Stats(*stub);
  REQUIRE(stats.pools_size() == 1);
  CHECK(stats.memory_budget_bytes() == uint64_t{1} << 30);
  CHECK(stats.memory_used_bytes() <= stats.memory_budget_bytes());
  CHECK(stats.pools(0).bookkeeping_bytes() == uint64_t{resp.pool().num_blocks()} * 3 * 16);
  CHECK(stats.memory_used_bytes() ==
        stats.pools(0).bytes() + stats.pools(0).bookkeeping_bytes() + stats.input_buffer_bytes());
  CHECK(AccountingBalances(*stub));
}

TEST_CASE("an Allocate whose reply no client could receive is refused up front", "[service]") {
  auto daemon = DaemonProcess::Start({"--memory_budget=2G"});
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  v1::AttachResponse attached;
  // 32 layers of 512-byte blocks, room for 1M tokens.
  REQUIRE(Attach(*stub, Model("deep", 32, 1, 8, v1::DTYPE_FP16, 16), 65536, &attached).ok());
  grpc::ClientContext ctx;
  v1::AllocateRequest req;
  req.set_session_token(attached.session_token());
  req.set_sequence_id("million");
  req.set_num_new_tokens(1 << 20);
  v1::AllocateResponse resp;
  const grpc::Status s = stub->Allocate(&ctx, req, &resp);
  REQUIRE(s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
  CHECK_THAT(s.error_message(), Catch::StartsWith("num_new_tokens 1048576 would make a reply of"));
  CHECK_THAT(s.error_message(), Catch::Contains("this pool accepts at most"));
  CHECK(UsedBlocks(*stub) == 0);
  CHECK(Stats(*stub).num_sequences() == 0);
  CHECK(AccountingBalances(*stub));
}

TEST_CASE("megabyte strings get INVALID_ARGUMENT with a short message", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  const std::string huge(4 << 20, 'x');
  v1::AttachResponse attached;
  grpc::Status s = Attach(*stub, Model(huge, 2, 2, 8, v1::DTYPE_FP16, 16), 8, &attached);
  REQUIRE(s.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK_THAT(s.error_message(), Catch::StartsWith("model.name must be"));
  CHECK(s.error_message().size() < 512);

  REQUIRE(Attach(*stub, Model("m", 2, 2, 8, v1::DTYPE_FP16, 16), 8, &attached).ok());
  {
    grpc::ClientContext ctx;
    v1::AllocateRequest req;
    req.set_session_token(attached.session_token());
    req.set_sequence_id(huge);
    req.set_num_new_tokens(1);
    v1::AllocateResponse resp;
    s = stub->Allocate(&ctx, req, &resp);
    CHECK(s.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK(s.error_message().size() < 512);
  }
  {
    grpc::ClientContext ctx;
    v1::AllocateRequest req;
    req.set_session_token(attached.session_token());
    req.set_sequence_id("s");
    req.set_num_new_tokens(20);
    v1::AllocateResponse resp;
    REQUIRE(stub->Allocate(&ctx, req, &resp).ok());
  }
  {
    grpc::ClientContext ctx;
    v1::CompressRequest req;
    req.set_session_token(attached.session_token());
    req.set_sequence_id("s");
    req.mutable_policy()->set_preset(huge);
    req.set_reserve_ratio(0.5);
    v1::CompressResponse resp;
    s = stub->Compress(&ctx, req, &resp);
    CHECK(s.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK_THAT(s.error_message(), Catch::StartsWith("policy.preset \"xxxx"));
    CHECK(s.error_message().size() < 512);
  }
  CHECK(UsedBlocks(*stub) == 4);  // 2 blocks in each of 2 layers
  CHECK(AccountingBalances(*stub));
}

}  // namespace
}  // namespace cachemgr::testing
