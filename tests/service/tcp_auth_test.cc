// TCP is off by default and, when on, every call must carry the bearer token.
#include <catch2/catch.hpp>
#include <fstream>
#include <regex>

#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"
#include "tests/support/temp_dir.h"

namespace cachemgr::testing {
namespace {

grpc::Status StatsOverTcp(int port, const std::string& authorization) {
  auto stub = v1::CacheManager::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
  v1::StatsResponse resp;
  return stub->Stats(&ctx, v1::StatsRequest(), &resp);
}

TEST_CASE("TCP callers need the bearer token; Unix callers do not", "[service]") {
  TempDir secrets;
  const std::string token = "s3cret-token-0123456789";
  { std::ofstream(secrets.file("token")) << token << "\n"; }
  auto daemon = DaemonProcess::Start(
      {"--tcp_address=127.0.0.1:0", "--tcp_token_file=" + secrets.file("token")});
  REQUIRE(daemon.ok());
  std::smatch m;
  const std::string log = (*daemon)->log_contents();
  REQUIRE(std::regex_search(log, m, std::regex("127\\.0\\.0\\.1:0 port ([0-9]+)")));
  const int port = std::stoi(m[1]);
  REQUIRE(port > 0);

  const grpc::Status none = StatsOverTcp(port, "");
  CHECK(none.error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK_THAT(none.error_message(), Catch::Contains("authorization"));
  CHECK(StatsOverTcp(port, "Bearer wrong-token-0123456789").error_code() ==
        grpc::StatusCode::UNAUTHENTICATED);
  CHECK(StatsOverTcp(port, token).error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(StatsOverTcp(port, "Bearer " + token).ok());

  auto unix_stub = RawStub((*daemon)->socket_path());
  grpc::ClientContext ctx;
  v1::StatsResponse resp;
  CHECK(unix_stub->Stats(&ctx, v1::StatsRequest(), &resp).ok());
}

TEST_CASE("TCP without a token file is refused at startup", "[service]") {
  auto child = ChildProcess::Spawn(
      DaemonPath(), {"--socket=/tmp/cachemgr-never.sock", "--tcp_address=127.0.0.1:0"});
  REQUIRE(child.ok());
  auto code = (*child)->Wait(absl::Seconds(10));
  REQUIRE(code.ok());
  CHECK(*code == 2);
}

}  // namespace
}  // namespace cachemgr::testing
