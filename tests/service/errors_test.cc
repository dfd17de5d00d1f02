// Every RPC of the real daemon with bad input: the precise status, a message naming the field,
// and no change to the daemon's state.
#include <catch2/catch.hpp>
#include <functional>

#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

struct Snapshot {
  std::vector<uint32_t> used;            // per pool and layer
  std::vector<uint32_t> prefix_entries;  // per pool
  uint32_t sequences = 0;
  size_t clients = 0;
  uint64_t memory_used_bytes = 0;
  bool operator==(const Snapshot&) const = default;
};

Snapshot Take(v1::CacheManager::Stub& stub) {
  grpc::ClientContext ctx;
  v1::StatsResponse resp;
  REQUIRE(stub.Stats(&ctx, v1::StatsRequest(), &resp).ok());
  Snapshot s;
  for (const auto& p : resp.pools()) {
    for (const auto& l : p.layers()) s.used.push_back(l.used_blocks());
    s.prefix_entries.push_back(p.prefix_entries());
  }
  s.sequences = resp.num_sequences();
  s.clients = resp.clients_size();
  s.memory_used_bytes = resp.memory_used_bytes();
  return s;
}

struct Case {
  std::string name;
  std::function<grpc::Status(v1::CacheManager::Stub&)> call;
  grpc::StatusCode code;
  std::string message_part;
};

template <typename Req, typename Resp>
std::function<grpc::Status(v1::CacheManager::Stub&)> Call(
    grpc::Status (v1::CacheManager::Stub::*method)(grpc::ClientContext*, const Req&, Resp*),
    Req req) {
  return [method, req](v1::CacheManager::Stub& stub) {
    grpc::ClientContext ctx;
    Resp resp;
    return (stub.*method)(&ctx, req, &resp);
  };
}

TEST_CASE("every RPC rejects bad input precisely and changes nothing", "[service]") {
  auto daemon = DaemonProcess::Start({"--memory_budget=64M", "--default_pool_bytes=1M"});
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  using S = v1::CacheManager::Stub;

  // Two clients sharing a pool of 8 blocks, each with a sequence.
  auto attach = [&](const std::string& name) {
    grpc::ClientContext ctx;
    v1::AttachRequest req;
    req.set_client_name(name);
    *req.mutable_model() = StoriesModel();
    req.set_num_blocks(8);
    v1::AttachResponse resp;
    REQUIRE(stub->Attach(&ctx, req, &resp).ok());
    return resp.session_token();
  };
  const std::string a = attach("a");
  const std::string b = attach("b");
  auto allocate = [&](const std::string& token, const std::string& id, uint32_t n) {
    grpc::ClientContext ctx;
    v1::AllocateRequest req;
    req.set_session_token(token);
    req.set_sequence_id(id);
    req.set_num_new_tokens(n);
    v1::AllocateResponse resp;
    return stub->Allocate(&ctx, req, &resp);
  };
  REQUIRE(allocate(a, "seq-a", 20).ok());  // 2 blocks per layer
  REQUIRE(allocate(b, "seq-b", 16).ok());  // 1 block per layer; 5 free
  {
    // seq-a's full first block is stored under "h0".
    grpc::ClientContext ctx;
    v1::StorePrefixRequest req;
    req.set_session_token(a);
    req.set_sequence_id("seq-a");
    req.add_block_hashes("h0");
    v1::StorePrefixResponse resp;
    REQUIRE(stub->StorePrefix(&ctx, req, &resp).ok());
    REQUIRE(resp.stored() == 1);
  }

  auto attach_req = [](std::function<void(v1::AttachRequest&)> edit) {
    v1::AttachRequest r;
    r.set_client_name("x");
    *r.mutable_model() = StoriesModel("fresh");
    r.set_num_blocks(4);
    edit(r);
    return r;
  };
  auto alloc_req = [&](std::string token, std::string id, uint32_t n) {
    v1::AllocateRequest r;
    r.set_session_token(token);
    r.set_sequence_id(id);
    r.set_num_new_tokens(n);
    return r;
  };
  auto fork_req = [](std::string token, std::string parent, std::string child) {
    v1::ForkRequest r;
    r.set_session_token(token);
    r.set_parent_sequence_id(parent);
    r.set_child_sequence_id(child);
    return r;
  };
  auto free_req = [](std::string token, std::string id) {
    v1::FreeRequest r;
    r.set_session_token(token);
    r.set_sequence_id(id);
    return r;
  };
  auto get_req = [](std::string token, std::string id) {
    v1::GetSequenceRequest r;
    r.set_session_token(token);
    r.set_sequence_id(id);
    return r;
  };
  auto store_req = [](std::string token, std::string id, uint32_t first_block,
                      std::vector<std::string> hashes) {
    v1::StorePrefixRequest r;
    r.set_session_token(token);
    r.set_sequence_id(id);
    r.set_first_block(first_block);
    for (auto& h : hashes) r.add_block_hashes(h);
    return r;
  };
  auto match_req = [](std::string token, std::vector<std::string> hashes) {
    v1::MatchPrefixRequest r;
    r.set_session_token(token);
    for (auto& h : hashes) r.add_block_hashes(h);
    return r;
  };
  auto load_req = [](std::string token, std::string id, std::vector<std::string> hashes) {
    v1::LoadPrefixRequest r;
    r.set_session_token(token);
    r.set_sequence_id(id);
    for (auto& h : hashes) r.add_block_hashes(h);
    return r;
  };
  const std::string long_hash(65, 'x');
  v1::HeartbeatRequest hb;
  hb.set_session_token("not-a-token");
  v1::DetachRequest detach;
  detach.set_session_token("not-a-token");
  v1::ListSequencesRequest list;
  list.set_session_token("not-a-token");

  using C = grpc::StatusCode;
  const std::vector<Case> cases = {
      {"attach without model", Call(&S::Attach, attach_req([](auto& r) { r.clear_model(); })),
       C::INVALID_ARGUMENT, "model is required"},
      {"attach empty name", Call(&S::Attach, attach_req([](auto& r) { r.set_client_name(""); })),
       C::INVALID_ARGUMENT, "client_name"},
      {"attach bad dtype", Call(&S::Attach, attach_req([](auto& r) {
         r.mutable_model()->set_dtype(v1::DTYPE_UNSPECIFIED);
       })),
       C::INVALID_ARGUMENT, "model.dtype"},
      {"attach bad layout", Call(&S::Attach, attach_req([](auto& r) {
         r.mutable_model()->set_layout(v1::CACHE_LAYOUT_UNSPECIFIED);
       })),
       C::INVALID_ARGUMENT, "model.layout"},
      {"attach bad rope", Call(&S::Attach, attach_req([](auto& r) {
         r.mutable_model()->mutable_rope()->set_style(v1::ROPE_STYLE_UNSPECIFIED);
       })),
       C::INVALID_ARGUMENT, "model.rope.style"},
      {"attach zero kv heads",
       Call(&S::Attach, attach_req([](auto& r) { r.mutable_model()->set_num_kv_heads(0); })),
       C::INVALID_ARGUMENT, "model.num_kv_heads"},
      {"attach huge head_dim",
       Call(&S::Attach, attach_req([](auto& r) { r.mutable_model()->set_head_dim(5000); })),
       C::INVALID_ARGUMENT, "model.head_dim"},
      {"attach other description", Call(&S::Attach, attach_req([](auto& r) {
         *r.mutable_model() = StoriesModel();
         r.mutable_model()->set_head_dim(16);
       })),
       C::FAILED_PRECONDITION, "stories260K"},
      {"attach over budget",
       Call(&S::Attach, attach_req([](auto& r) { r.set_num_blocks(100000); })),
       C::RESOURCE_EXHAUSTED, "num_blocks 100000"},
      {"heartbeat bad token", Call(&S::Heartbeat, hb), C::NOT_FOUND, "session_token"},
      {"detach bad token", Call(&S::Detach, detach), C::NOT_FOUND, "session_token"},
      {"allocate bad token", Call(&S::Allocate, alloc_req("nope", "s", 1)), C::NOT_FOUND,
       "session_token"},
      {"allocate empty id", Call(&S::Allocate, alloc_req(a, "", 1)), C::INVALID_ARGUMENT,
       "sequence_id"},
      {"allocate zero tokens", Call(&S::Allocate, alloc_req(a, "seq-a", 0)), C::INVALID_ARGUMENT,
       "num_new_tokens"},
      {"allocate other's", Call(&S::Allocate, alloc_req(a, "seq-b", 1)), C::PERMISSION_DENIED,
       "seq-b"},
      {"allocate too many", Call(&S::Allocate, alloc_req(a, "seq-a", 100)), C::RESOURCE_EXHAUSTED,
       "layer 0 needs"},
      {"free bad token", Call(&S::Free, free_req("nope", "seq-a")), C::NOT_FOUND, "session_token"},
      {"free missing", Call(&S::Free, free_req(a, "ghost")), C::NOT_FOUND, "ghost"},
      {"free other's", Call(&S::Free, free_req(a, "seq-b")), C::PERMISSION_DENIED, "seq-b"},
      {"free bad id", Call(&S::Free, free_req(a, "has space")), C::INVALID_ARGUMENT, "sequence_id"},
      {"fork existing child", Call(&S::Fork, fork_req(a, "seq-a", "seq-b")), C::ALREADY_EXISTS,
       "child_sequence_id"},
      {"fork other's parent", Call(&S::Fork, fork_req(a, "seq-b", "new")), C::PERMISSION_DENIED,
       "parent_sequence_id"},
      {"fork missing parent", Call(&S::Fork, fork_req(a, "ghost", "new")), C::NOT_FOUND,
       "parent_sequence_id"},
      {"fork empty child", Call(&S::Fork, fork_req(a, "seq-a", "")), C::INVALID_ARGUMENT,
       "child_sequence_id"},
      {"fork bad token", Call(&S::Fork, fork_req("nope", "seq-a", "new")), C::NOT_FOUND,
       "session_token"},
      {"get other's", Call(&S::GetSequence, get_req(a, "seq-b")), C::PERMISSION_DENIED, "seq-b"},
      {"get missing", Call(&S::GetSequence, get_req("", "ghost")), C::NOT_FOUND, "ghost"},
      {"get empty id", Call(&S::GetSequence, get_req("", "")), C::INVALID_ARGUMENT, "sequence_id"},
      {"list bad token", Call(&S::ListSequences, list), C::NOT_FOUND, "session_token"},
      {"store prefix no hashes", Call(&S::StorePrefix, store_req(a, "seq-a", 0, {})),
       C::INVALID_ARGUMENT, "block_hashes must hold 1-16384 hashes (got 0)"},
      {"store prefix long hash", Call(&S::StorePrefix, store_req(a, "seq-a", 0, {"h", long_hash})),
       C::INVALID_ARGUMENT, "block_hashes[1] must be 1-64 bytes (got 65)"},
      {"store prefix empty hash", Call(&S::StorePrefix, store_req(a, "seq-a", 0, {""})),
       C::INVALID_ARGUMENT, "block_hashes[0]"},
      {"store prefix partial block", Call(&S::StorePrefix, store_req(a, "seq-a", 1, {"h1"})),
       C::INVALID_ARGUMENT, "first_block 1 and 1 block_hashes name blocks up to 1"},
      {"store prefix other's", Call(&S::StorePrefix, store_req(a, "seq-b", 0, {"h"})),
       C::PERMISSION_DENIED, "seq-b"},
      {"store prefix missing", Call(&S::StorePrefix, store_req(a, "ghost", 0, {"h"})), C::NOT_FOUND,
       "ghost"},
      {"store prefix bad token", Call(&S::StorePrefix, store_req("nope", "seq-a", 0, {"h"})),
       C::NOT_FOUND, "session_token"},
      {"match prefix no hashes", Call(&S::MatchPrefix, match_req(a, {})), C::INVALID_ARGUMENT,
       "block_hashes must hold"},
      {"match prefix long hash", Call(&S::MatchPrefix, match_req(a, {long_hash})),
       C::INVALID_ARGUMENT, "block_hashes[0]"},
      {"match prefix bad token", Call(&S::MatchPrefix, match_req("nope", {"h0"})), C::NOT_FOUND,
       "session_token"},
      {"load prefix existing", Call(&S::LoadPrefix, load_req(a, "seq-b", {"h0"})),
       C::ALREADY_EXISTS, "sequence_id \"seq-b\" already exists"},
      {"load prefix bad id", Call(&S::LoadPrefix, load_req(a, "has space", {"h0"})),
       C::INVALID_ARGUMENT, "sequence_id"},
      {"load prefix no hashes", Call(&S::LoadPrefix, load_req(a, "new", {})), C::INVALID_ARGUMENT,
       "block_hashes must hold"},
      {"load prefix long hash", Call(&S::LoadPrefix, load_req(a, "new", {"h0", long_hash})),
       C::INVALID_ARGUMENT, "block_hashes[1]"},
      {"load prefix bad token", Call(&S::LoadPrefix, load_req("nope", "new", {"h0"})), C::NOT_FOUND,
       "session_token"},
  };
  const Snapshot before = Take(*stub);
  for (const Case& c : cases) {
    INFO(c.name);
    const grpc::Status status = c.call(*stub);
    INFO(status.error_message());
    CHECK(status.error_code() == c.code);
    CHECK_THAT(status.error_message(), Catch::Contains(c.message_part));
    CHECK(Take(*stub) == before);
  }
  CHECK(AccountingBalances(*stub));
  {
    // The stored block is still served after all of that.
    grpc::ClientContext ctx;
    v1::MatchPrefixResponse resp;
    REQUIRE(stub->MatchPrefix(&ctx, match_req(b, {"h0", "h1"}), &resp).ok());
    CHECK(resp.matched_blocks() == 1);
  }

  SECTION("watch with an unknown event type") {
    grpc::ClientContext ctx;
    AddOperatorCredential(ctx, (*daemon)->socket_path());
    v1::WatchRequest req;
    req.add_types(static_cast<v1::EventType>(99));
    auto reader = stub->Watch(&ctx, req);
    v1::Event e;
    CHECK_FALSE(reader->Read(&e));
    const grpc::Status s = reader->Finish();
    CHECK(s.error_code() == C::INVALID_ARGUMENT);
    CHECK_THAT(s.error_message(), Catch::Contains("types"));
  }
}

}  // namespace
}  // namespace cachemgr::testing
