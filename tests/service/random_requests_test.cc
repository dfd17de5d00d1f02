// Thousands of random, mostly-wrong requests from several clients: the daemon answers every
// one with a status (never crashes or hangs), and the block accounting balances throughout.
#include <catch2/catch.hpp>
#include <random>

#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

TEST_CASE("random requests never break the daemon or its accounting", "[service]") {
  auto daemon = DaemonProcess::Start({"--memory_budget=64M", "--default_pool_bytes=1M"});
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  std::mt19937 rng(1234);
  auto pick = [&](auto... options) {
    const std::vector<std::string> all = {options...};
    return all[rng() % all.size()];
  };
  std::vector<std::string> tokens = {"", "bogus", std::string(5000, 'z')};
  for (int i = 0; i < 3; ++i) {
    grpc::ClientContext ctx;
    v1::AttachRequest req;
    req.set_client_name("fuzz" + std::to_string(i));
    *req.mutable_model() = StoriesModel();
    req.set_num_blocks(12);
    v1::AttachResponse resp;
    REQUIRE(stub->Attach(&ctx, req, &resp).ok());
    tokens.push_back(resp.session_token());
  }
  auto token = [&] { return tokens[rng() % tokens.size()]; };
  auto seq = [&] { return pick("s1", "s2", "s3", "", "x y", std::string(300, 'q'), "\x01"); };
  int ok_calls = 0;
  for (int i = 0; i < 3000; ++i) {
    grpc::ClientContext ctx;
    grpc::Status status;
    switch (rng() % 8) {
      case 0: {
        v1::AllocateRequest req;
        req.set_session_token(token());
        req.set_sequence_id(seq());
        req.set_num_new_tokens(rng() % 3 == 0 ? rng() : rng() % 40);
        v1::AllocateResponse resp;
        status = stub->Allocate(&ctx, req, &resp);
        break;
      }
      case 1: {
        v1::FreeRequest req;
        req.set_session_token(token());
        req.set_sequence_id(seq());
        v1::FreeResponse resp;
        status = stub->Free(&ctx, req, &resp);
        break;
      }
      case 2: {
        v1::ForkRequest req;
        req.set_session_token(token());
        req.set_parent_sequence_id(seq());
        req.set_child_sequence_id(seq());
        v1::ForkResponse resp;
        status = stub->Fork(&ctx, req, &resp);
        break;
      }
      case 3: {
        v1::GetSequenceRequest req;
        req.set_session_token(token());
        req.set_sequence_id(seq());
        req.set_include_kv_digest(rng() % 2);
        v1::GetSequenceResponse resp;
        status = stub->GetSequence(&ctx, req, &resp);
        break;
      }
      case 4: {
        v1::AttachRequest req;
        req.set_client_name(pick("f", "", "a b"));
        v1::ModelSpec* m = req.mutable_model();
        *m = StoriesModel(pick("stories260K", "other", ""));
        m->set_num_layers(rng() % 3 == 0 ? rng() : m->num_layers());
        m->set_num_kv_heads(rng() % 3 == 0 ? rng() % 9 : m->num_kv_heads());
        m->set_dtype(static_cast<v1::DType>(rng() % 5));
        m->set_block_size(rng() % 3 == 0 ? rng() : 16);
        m->mutable_rope()->set_theta(rng() % 4 == 0 ? -1.0 : 10000.0);
        req.set_num_blocks(rng() % 3 == 0 ? rng() : 4);
        v1::AttachResponse resp;
        status = stub->Attach(&ctx, req, &resp);
        if (status.ok()) {
          // Detach right away so fuzz pools do not pile up.
          grpc::ClientContext dctx;
          v1::DetachRequest d;
          d.set_session_token(resp.session_token());
          v1::DetachResponse dresp;
          REQUIRE(stub->Detach(&dctx, d, &dresp).ok());
        }
        break;
      }
      case 6: {
        v1::StepRequest req;
        req.set_session_token(token());
        req.set_include_slot_mapping(rng() % 2);
        const int n = rng() % 4 == 0 ? static_cast<int>(rng() % 5000) : static_cast<int>(rng() % 8);
        for (int j = 0; j < n; ++j) {
          v1::StepOp* op = req.add_ops();
          switch (rng() % 4) {
            case 0:
              op->mutable_allocate()->set_sequence_id(seq());
              op->mutable_allocate()->set_num_new_tokens(rng() % 3 == 0 ? rng() : rng() % 40);
              break;
            case 1:
              op->set_free(seq());
              break;
            case 2:
              op->mutable_fork()->set_parent_sequence_id(seq());
              op->mutable_fork()->set_child_sequence_id(seq());
              break;
            default:
              break;  // no op set
          }
        }
        v1::StepResponse resp;
        status = stub->Step(&ctx, req, &resp);
        if (status.ok()) {
          REQUIRE(resp.results_size() == req.ops_size());
          for (const v1::StepResult& r : resp.results()) {
            REQUIRE(r.code() != static_cast<int>(grpc::StatusCode::INTERNAL));
            REQUIRE(r.code() != static_cast<int>(grpc::StatusCode::UNKNOWN));
          }
        }
        break;
      }
      case 5: {
        v1::HeartbeatRequest req;
        req.set_session_token(token());
        v1::HeartbeatResponse resp;
        status = stub->Heartbeat(&ctx, req, &resp);
        break;
      }
      default: {
        v1::ListSequencesRequest req;
        req.set_session_token(token());
        v1::ListSequencesResponse resp;
        status = stub->ListSequences(&ctx, req, &resp);
        break;
      }
    }
    ok_calls += status.ok();
    REQUIRE(status.error_code() != grpc::StatusCode::INTERNAL);
    REQUIRE(status.error_code() != grpc::StatusCode::UNKNOWN);
    if (i % 100 == 0) REQUIRE(AccountingBalances(*stub));
  }
  CHECK(ok_calls > 100);  // the run did real work, not only rejections
  REQUIRE(AccountingBalances(*stub));
  REQUIRE((*daemon)->running());
  CHECK((*daemon)->Terminate(SIGTERM).value_or(-1) == 0);
}

}  // namespace
}  // namespace cachemgr::testing
