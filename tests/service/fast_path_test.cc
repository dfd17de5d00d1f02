// The fast path (cachemgr/service/fast_path_server.h): the same answers as the RPCs, and a
// daemon that survives whatever arrives on its socket.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cachemgr/util/fast_path_wire.h"
#include "cachemgr/util/unique_fd.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

UniqueFd ConnectFast(const std::string& path) {
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    return UniqueFd();
  }
  timeval tv{10, 0};  // no test waits forever on a reply
  setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

bool SendAll(int fd, const std::string& bytes) {
  for (size_t sent = 0; sent < bytes.size();) {
    const ssize_t n = send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return true;
}

std::string Frame(uint8_t method, const std::string& payload) {
  std::string out;
  AppendFastFrameHeader(static_cast<uint32_t>(payload.size() + 1), &out);
  out.push_back(static_cast<char>(method));
  out += payload;
  return out;
}

struct Reply {
  bool received = false;  // false: EOF or timeout before a whole reply
  absl::StatusCode code = absl::StatusCode::kUnknown;
  std::string payload;  // the response message, or the error message
};

Reply ReadReply(int fd) {
  FastFrameReader reader(UINT32_MAX);
  Reply reply;
  for (;;) {
    absl::StatusOr<std::optional<std::string_view>> body = reader.Next();
    if (!body.ok()) return reply;
    if (body->has_value()) {
      reply.received = true;
      reply.code = static_cast<absl::StatusCode>(static_cast<unsigned char>((**body)[0]));
      reply.payload = std::string((**body).substr(1));
      return reply;
    }
    char buffer[4096];
    const ssize_t n = recv(fd, buffer, std::min(sizeof(buffer), reader.missing()), 0);
    if (n <= 0) return reply;
    reader.Append(std::string_view(buffer, static_cast<size_t>(n)));
  }
}

// True when the daemon closed the connection (EOF within 10 s).
bool ClosedByDaemon(int fd) {
  char byte;
  return recv(fd, &byte, 1, 0) == 0;
}

std::string AttachRaw(v1::CacheManager::Stub& stub, const std::string& name) {
  grpc::ClientContext ctx;
  v1::AttachRequest request;
  request.set_client_name(name);
  *request.mutable_model() = StoriesModel();
  request.set_num_blocks(64);
  v1::AttachResponse response;
  const grpc::Status status = stub.Attach(&ctx, request, &response);
  REQUIRE(status.ok());
  return response.session_token();
}

// One call both ways: over gRPC to one daemon, over the fast path to its twin.
template <typename Request, typename Response>
using SyncRpc = grpc::Status (v1::CacheManager::Stub::*)(grpc::ClientContext*, const Request&,
                                                         Response*);

struct Twins {
  v1::CacheManager::Stub* grpc_stub;
  std::string grpc_token;
  int fast_fd;
  std::string fast_token;
};

template <typename Request, typename Response>
void ExpectSameAnswer(const Twins& twins, FastMethod method, Request request,
                      SyncRpc<Request, Response> rpc) {
  v1::CacheManager::Stub& grpc_stub = *twins.grpc_stub;
  const std::string& grpc_token = twins.grpc_token;
  const int fast_fd = twins.fast_fd;
  const std::string& fast_token = twins.fast_token;
  Response by_grpc;
  grpc::ClientContext ctx;
  request.set_session_token(grpc_token);
  const grpc::Status grpc_status = (grpc_stub.*rpc)(&ctx, request, &by_grpc);
  request.set_session_token(fast_token);
  REQUIRE(SendAll(fast_fd, Frame(static_cast<uint8_t>(method), request.SerializeAsString())));
  const Reply reply = ReadReply(fast_fd);
  REQUIRE(reply.received);
  CAPTURE(request.DebugString(), grpc_status.error_message(), reply.payload);
  CHECK(static_cast<int>(reply.code) == static_cast<int>(grpc_status.error_code()));
  if (grpc_status.ok()) {
    Response by_fast;
    REQUIRE(by_fast.ParseFromString(reply.payload));
    if constexpr (std::is_same_v<Response, v1::HeartbeatResponse>) {
      // Each daemon names its own boot; the lease renewed is the same.
      CHECK(by_fast.boot_id() == fast_token.substr(0, by_fast.boot_id().size()));
      CHECK(by_fast.lease_remaining_ms() > 0);
    } else {
      CHECK(by_fast.DebugString() == by_grpc.DebugString());
    }
  } else {
    CHECK(reply.payload == grpc_status.error_message());
  }
}

v1::AllocateRequest Allocate(const std::string& id, uint32_t tokens) {
  v1::AllocateRequest r;
  r.set_sequence_id(id);
  r.set_num_new_tokens(tokens);
  return r;
}

TEST_CASE("the fast path answers every call as its RPC does", "[service]") {
  auto grpc_daemon = DaemonProcess::Start();
  auto fast_daemon = DaemonProcess::Start();
  REQUIRE(grpc_daemon.ok());
  REQUIRE(fast_daemon.ok());
  auto grpc_stub = RawStub((*grpc_daemon)->socket_path());
  auto fast_stub = RawStub((*fast_daemon)->socket_path());
  const std::string grpc_token = AttachRaw(*grpc_stub, "twin");
  const std::string fast_token = AttachRaw(*fast_stub, "twin");
  UniqueFd fast = ConnectFast((*fast_daemon)->socket_path() + ".fast");
  REQUIRE(fast.valid());
  const Twins twins{grpc_stub.get(), grpc_token, fast.get(), fast_token};
  using Stub = v1::CacheManager::Stub;
  auto allocate = [&](const std::string& id, uint32_t tokens) {
    ExpectSameAnswer(twins, FastMethod::kAllocate, Allocate(id, tokens), &Stub::Allocate);
  };
  auto free = [&](const std::string& id) {
    v1::FreeRequest r;
    r.set_sequence_id(id);
    ExpectSameAnswer(twins, FastMethod::kFree, r, &Stub::Free);
  };
  auto fork = [&](const std::string& parent, const std::string& child) {
    v1::ForkRequest r;
    r.set_parent_sequence_id(parent);
    r.set_child_sequence_id(child);
    ExpectSameAnswer(twins, FastMethod::kFork, r, &Stub::Fork);
  };
  // Successes.
  allocate("a", 40);
  allocate("a", 1);
  allocate("b", 16);
  fork("a", "a2");
  allocate("a2", 30);  // copy-on-write of the shared last block
  ExpectSameAnswer(twins, FastMethod::kHeartbeat, v1::HeartbeatRequest(), &Stub::Heartbeat);
  // Every kind of refusal: bad fields, unknown and existing sequences, over the pool.
  allocate("", 1);
  allocate("has space", 1);
  allocate(std::string(300, 'x'), 1);
  allocate("a", 0);
  allocate("c", 64 * 16 + 1);
  free("nope");
  fork("nope", "x");
  fork("a", "b");
  // A step mixing successes and failures, with and without slot mappings.
  for (bool slots : {false, true}) {
    v1::StepRequest step;
    step.set_include_slot_mapping(slots);
    auto* op = step.add_ops()->mutable_allocate();
    op->set_sequence_id("a");
    op->set_num_new_tokens(20);
    step.add_ops()->set_free(slots ? "b" : "zz");
    auto* f = step.add_ops()->mutable_fork();
    f->set_parent_sequence_id("a");
    f->set_child_sequence_id(slots ? "a4" : "a3");
    step.add_ops()->mutable_allocate()->set_sequence_id("");
    ExpectSameAnswer(twins, FastMethod::kStep, step, &Stub::Step);
  }
  v1::StepRequest empty_op;
  empty_op.add_ops();
  ExpectSameAnswer(twins, FastMethod::kStep, empty_op, &Stub::Step);
  v1::StepRequest too_many;
  for (int i = 0; i < 4097; ++i) too_many.add_ops()->set_free("a");
  ExpectSameAnswer(twins, FastMethod::kStep, too_many, &Stub::Step);
  free("a");
  free("a2");
  // A token the daemon does not know.
  const Twins wrong_token{grpc_stub.get(), "not-a-token", fast.get(), "not-a-token"};
  ExpectSameAnswer(wrong_token, FastMethod::kAllocate, Allocate("d", 1), &Stub::Allocate);
  ExpectSameAnswer(wrong_token, FastMethod::kHeartbeat, v1::HeartbeatRequest(), &Stub::Heartbeat);

  // Both daemons hold the same blocks, and their accounting balances.
  CHECK(UsedBlocks(*grpc_stub) == UsedBlocks(*fast_stub));
  CHECK(AccountingBalances(*fast_stub));
}

TEST_CASE("the fast path survives hostile frames and keeps serving", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  const std::string fast_path = (*daemon)->socket_path() + ".fast";
  auto stub = RawStub((*daemon)->socket_path());
  const std::string token = AttachRaw(*stub, "hostile");
  v1::AllocateRequest good = Allocate("s", 20);
  good.set_session_token(token);
  const std::string good_frame = Frame(2, good.SerializeAsString());
  auto heartbeat_frame = [&] {
    v1::HeartbeatRequest r;
    r.set_session_token(token);
    return Frame(1, r.SerializeAsString());
  };

  SECTION("a method byte that names no method: UNIMPLEMENTED, and the connection goes on") {
    UniqueFd fd = ConnectFast(fast_path);
    REQUIRE(SendAll(fd.get(), Frame(42, "whatever")));
    const Reply reply = ReadReply(fd.get());
    REQUIRE(reply.received);
    CHECK(reply.code == absl::StatusCode::kUnimplemented);
    CHECK_THAT(reply.payload, Catch::Contains("fast path method 42 is unknown"));
    REQUIRE(SendAll(fd.get(), heartbeat_frame()));
    CHECK(ReadReply(fd.get()).code == absl::StatusCode::kOk);
  }
  SECTION("bytes that do not parse: the RPC's INVALID_ARGUMENT, and the connection goes on") {
    UniqueFd fd = ConnectFast(fast_path);
    REQUIRE(SendAll(fd.get(), Frame(2, std::string("\x08\xff\xff\xff", 4))));
    const Reply reply = ReadReply(fd.get());
    REQUIRE(reply.received);
    CHECK(reply.code == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(reply.payload, Catch::StartsWith("request is not a valid "
                                                "cachemgr.v1.AllocateRequest"));
    // A sequence id that is not UTF-8.
    REQUIRE(SendAll(fd.get(), Frame(2, std::string("\x0a\x02\xff\xfe", 4))));
    CHECK(ReadReply(fd.get()).code == absl::StatusCode::kInvalidArgument);
    REQUIRE(SendAll(fd.get(), heartbeat_frame()));
    CHECK(ReadReply(fd.get()).code == absl::StatusCode::kOk);
  }
  SECTION("a frame over the limit, or empty: refused, then the connection is closed") {
    for (uint32_t length : {kMaxFastRequestBytes + 1, uint32_t{0xffffffff}, uint32_t{0}}) {
      CAPTURE(length);
      UniqueFd fd = ConnectFast(fast_path);
      std::string header;
      AppendFastFrameHeader(length, &header);
      REQUIRE(SendAll(fd.get(), header + "\x02"));
      const Reply reply = ReadReply(fd.get());
      REQUIRE(reply.received);
      CHECK(reply.code == (length == 0 ? absl::StatusCode::kInvalidArgument
                                       : absl::StatusCode::kResourceExhausted));
      CHECK(ClosedByDaemon(fd.get()));
    }
  }
  SECTION("a request cut off by its client is never applied") {
    {
      UniqueFd fd = ConnectFast(fast_path);
      REQUIRE(SendAll(fd.get(), good_frame.substr(0, good_frame.size() - 1)));
    }  // closed mid-frame
    v1::GetSequenceRequest get;
    get.set_session_token(token);
    get.set_sequence_id("s");
    v1::GetSequenceResponse got;
    UniqueFd fd = ConnectFast(fast_path);
    REQUIRE(SendAll(fd.get(), heartbeat_frame()));
    REQUIRE(ReadReply(fd.get()).code == absl::StatusCode::kOk);
    grpc::ClientContext ctx;
    CHECK(stub->GetSequence(&ctx, get, &got).error_code() == grpc::StatusCode::NOT_FOUND);
    CHECK(UsedBlocks(*stub) == 0);
  }
  SECTION("requests sent together are answered in order, then the half-closed peer") {
    UniqueFd fd = ConnectFast(fast_path);
    std::string batch;
    for (int i = 0; i < 50; ++i) {
      v1::AllocateRequest r = Allocate(absl::StrCat("p", i), 1 + i % 3);
      r.set_session_token(token);
      batch += Frame(2, r.SerializeAsString());
    }
    REQUIRE(SendAll(fd.get(), batch));
    shutdown(fd.get(), SHUT_WR);  // replies still come
    for (int i = 0; i < 50; ++i) {
      const Reply reply = ReadReply(fd.get());
      REQUIRE(reply.received);
      REQUIRE(reply.code == absl::StatusCode::kOk);
      v1::AllocateResponse response;
      REQUIRE(response.ParseFromString(reply.payload));
      CHECK(response.sequence_id() == absl::StrCat("p", i));
      CHECK(response.num_positions() == static_cast<uint64_t>(1 + i % 3));
    }
    CHECK(ClosedByDaemon(fd.get()));
  }
  SECTION("a client that never reads its replies does not hold up another") {
    UniqueFd hog = ConnectFast(fast_path);
    const int flags = fcntl(hog.get(), F_GETFL);
    fcntl(hog.get(), F_SETFL, flags | O_NONBLOCK);
    std::string beats;
    for (int i = 0; i < 2000; ++i) beats += heartbeat_frame();
    size_t pushed = 0;  // as much as the socket takes; the hog reads nothing
    for (int round = 0; round < 200; ++round) {
      const ssize_t n = send(hog.get(), beats.data(), beats.size(), MSG_NOSIGNAL);
      if (n > 0) pushed += static_cast<size_t>(n);
    }
    CHECK(pushed > 0);
    UniqueFd other = ConnectFast(fast_path);
    REQUIRE(SendAll(other.get(), good_frame));
    const Reply reply = ReadReply(other.get());
    REQUIRE(reply.received);
    CHECK(reply.code == absl::StatusCode::kOk);
  }
  SECTION("many connections, opened and dropped") {
    for (int i = 0; i < 200; ++i) {
      UniqueFd fd = ConnectFast(fast_path);
      REQUIRE(fd.valid());
      if (i % 2 == 0) REQUIRE(SendAll(fd.get(), heartbeat_frame()));
    }
    UniqueFd fd = ConnectFast(fast_path);
    REQUIRE(SendAll(fd.get(), heartbeat_frame()));
    CHECK(ReadReply(fd.get()).code == absl::StatusCode::kOk);
  }
  // Whatever happened, the daemon serves gRPC too and its books balance.
  grpc::ClientContext ctx;
  v1::HeartbeatRequest beat;
  beat.set_session_token(token);
  v1::HeartbeatResponse left;
  CHECK(stub->Heartbeat(&ctx, beat, &left).ok());
  CHECK(AccountingBalances(*stub));
  CHECK((*daemon)->running());
}

}  // namespace
}  // namespace cachemgr::testing
