// Requests the daemon cannot parse (issue 12, finding 10): every method answers INVALID_ARGUMENT
// with a message naming the request type (gRPC alone answers UNIMPLEMENTED with an empty
// message), and protobuf's own complaint lands in the daemon's JSON log, not beside it.
#include <catch2/catch.hpp>
#include <sstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/synchronization/notification.h"
#include "google/protobuf/descriptor.h"
#include "grpcpp/generic/generic_stub.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

grpc::Status RawCall(const std::string& socket, const std::string& method,
                     const std::string& bytes) {
  grpc::GenericStub stub(grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::Slice slice(bytes);
  grpc::ByteBuffer request(&slice, 1), response;
  grpc::Status status;
  absl::Notification done;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &request, &response, [&](grpc::Status s) {
    status = std::move(s);
    done.Notify();
  });
  done.WaitForNotification();
  return status;
}

TEST_CASE("unparseable requests get INVALID_ARGUMENT naming the request type", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  const google::protobuf::ServiceDescriptor* service =
      v1::AttachRequest::descriptor()->file()->FindServiceByName("CacheManager");
  REQUIRE(service != nullptr);
  REQUIRE(service->method_count() >= 13);
  // A truncated varint field: no protobuf message parses from it.
  const std::string garbage("\x08\xff\xff\xff", 4);
  for (int i = 0; i < service->method_count(); ++i) {
    const google::protobuf::MethodDescriptor* method = service->method(i);
    const grpc::Status status =
        RawCall(socket, "/" + std::string(service->full_name()) + "/" + method->name(), garbage);
    CAPTURE(method->name(), status.error_message());
    CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK_THAT(status.error_message(),
               Catch::Contains("request is not a valid " + method->input_type()->full_name()));
  }
  // A string field that is not UTF-8 (AttachRequest.client_name = "\xff\xfe").
  const grpc::Status utf8 =
      RawCall(socket, "/cachemgr.v1.CacheManager/Attach", std::string("\x0a\x02\xff\xfe", 4));
  CHECK(utf8.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK_THAT(utf8.error_message(), Catch::Contains("cachemgr.v1.AttachRequest"));
  // An unknown method is still UNIMPLEMENTED, as gRPC says.
  CHECK(RawCall(socket, "/cachemgr.v1.CacheManager/NoSuchMethod", "").error_code() ==
        grpc::StatusCode::UNIMPLEMENTED);

  // The daemon is unharmed, and every line it wrote is a JSON object, protobuf's too.
  auto stub = RawStub(socket);
  grpc::ClientContext ctx;
  v1::StatsResponse stats;
  CHECK(stub->Stats(&ctx, v1::StatsRequest(), &stats).ok());
  REQUIRE((*daemon)->Terminate(SIGTERM).ok());
  std::istringstream log((*daemon)->log_contents());
  std::string line;
  bool protobuf_line = false;
  while (std::getline(log, line)) {
    CAPTURE(line);
    CHECK(absl::StartsWith(line, "{\"ts\":"));
    CHECK(absl::EndsWith(line, "}"));
    protobuf_line = protobuf_line || (absl::StrContains(line, "\"source\":\"protobuf\"") &&
                                      absl::StrContains(line, "invalid UTF-8"));
  }
  CHECK(protobuf_line);
}

}  // namespace
}  // namespace cachemgr::testing
