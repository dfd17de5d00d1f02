#include "cachemgr/config.h"

#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>

#include "tests/support/temp_dir.h"

namespace cachemgr {
namespace {

absl::StatusOr<ParsedCommandLine> Parse(std::vector<std::string> args) {
  return ParseDaemonCommandLine(args);
}

TEST_CASE("defaults are sane and the share socket follows the socket", "[cpu]") {
  auto p = Parse({"--socket=/tmp/x.sock"});
  REQUIRE(p.ok());
  CHECK(p->config.socket_path == "/tmp/x.sock");
  CHECK(p->config.share_socket_path == "/tmp/x.sock.share");
  CHECK(p->config.manager.lease_timeout == absl::Seconds(10));
  CHECK(p->config.manager.memory_budget_bytes == (uint64_t{1} << 30));
  CHECK(p->config.enable_reflection);
  // The quarantine follows the lease timeout unless set; replies are bounded at 4 MiB.
  CHECK(p->config.manager.quarantine == absl::Seconds(10));
  CHECK(p->config.manager.max_reply_bytes == (uint64_t{4} << 20));
  auto q = Parse({"--lease_timeout_ms=3000", "--max_reply_bytes=16M"});
  REQUIRE(q.ok());
  CHECK(q->config.manager.quarantine == absl::Seconds(3));
  CHECK(q->config.manager.max_reply_bytes == (uint64_t{16} << 20));
  q = Parse({"--lease_timeout_ms=3000", "--quarantine_ms=60000"});
  REQUIRE(q.ok());
  CHECK(q->config.manager.quarantine == absl::Seconds(60));
}

TEST_CASE("flags accept both forms, byte suffixes and boolean negation", "[cpu]") {
  auto p = Parse({"--socket", "/tmp/a.sock", "--memory_budget=2G", "--default_pool_bytes=64M",
                  "--noreflection", "--lease_timeout_ms=500", "--heartbeat_interval_ms=100",
                  "--log_level=debug"});
  REQUIRE(p.ok());
  CHECK(p->config.manager.memory_budget_bytes == (uint64_t{2} << 30));
  CHECK(p->config.manager.default_pool_bytes == (uint64_t{64} << 20));
  CHECK_FALSE(p->config.enable_reflection);
  CHECK(p->config.manager.lease_timeout == absl::Milliseconds(500));
  CHECK(p->config.log_level == LogLevel::kDebug);
}

TEST_CASE("bad flags are named", "[cpu]") {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--bogus=1"}, "unknown flag --bogus"},
      {{"stray"}, "unexpected argument \"stray\""},
      {{"--memory_budget=lots"}, "--memory_budget must be a byte count"},
      {{"--lease_timeout_ms=100", "--heartbeat_interval_ms=200"}, "--lease_timeout_ms (100)"},
      {{"--default_block_size=0"}, "--default_block_size must be an integer in [1, 1024]"},
      {{"--tcp_address=127.0.0.1:5000"}, "--tcp_address needs --tcp_token_file"},
      {{"--socket=/tmp/" + std::string(120, 'x')}, "--socket is"},
      {{"--reflection=maybe"}, "--reflection must be true or false"},
      {{"--log_level=loud"}, "--log_level must be debug"},
      {{"--socket"}, "--socket needs a value"},
      {{"--quarantine_ms=5000"}, "--quarantine_ms (5000) must be at least --lease_timeout_ms"},
      {{"--quarantine_ms=0"}, "--quarantine_ms must be an integer in [1, "},
      {{"--max_reply_bytes=1K"}, "--max_reply_bytes must be a byte count in [64K, 1G]"},
      {{"--max_reply_bytes=2G"}, "--max_reply_bytes must be a byte count in [64K, 1G]"},
  };
  for (const auto& [args, message] : cases) {
    INFO(message);
    auto p = Parse(args);
    REQUIRE(p.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(p.status().message()), Catch::Contains(message));
  }
}

TEST_CASE("config file is read, flags override it, errors carry file:line", "[cpu]") {
  testing::TempDir dir;
  const std::string path = dir.path() + "/cachemgrd.conf";
  {
    std::ofstream f(path);
    f << "# comment\n\nsocket = /tmp/from-file.sock\nmemory_budget = 512M  # trailing\n"
      << "lease_timeout_ms = 3000\n";
  }
  auto p = Parse({"--config=" + path, "--lease_timeout_ms=4000"});
  REQUIRE(p.ok());
  CHECK(p->config.socket_path == "/tmp/from-file.sock");
  CHECK(p->config.manager.memory_budget_bytes == (uint64_t{512} << 20));
  CHECK(p->config.manager.lease_timeout == absl::Milliseconds(4000));

  {
    std::ofstream f(path);
    f << "socket = /tmp/a.sock\nnot a setting\n";
  }
  auto bad = Parse({"--config=" + path});
  REQUIRE(bad.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(bad.status().message()), Catch::Contains(path + ":2: expected"));
  {
    std::ofstream f(path);
    f << "colour = blue\n";
  }
  auto unknown = Parse({"--config=" + path});
  CHECK_THAT(std::string(unknown.status().message()), Catch::Contains(":1: unknown setting"));
  auto missing = Parse({"--config=" + dir.path() + "/nope.conf"});
  CHECK_THAT(std::string(missing.status().message()), Catch::Contains("cannot read"));
}

TEST_CASE("the shipped example config is valid", "[cpu]") {
  auto p = Parse({std::string("--config=") + CACHEMGR_SOURCE_DIR + "/deploy/cachemgrd.conf"});
  REQUIRE(p.ok());
  CHECK(p->config.socket_path == "/run/cachemgr/cachemgr.sock");
  CHECK(p->config.manager.memory_budget_bytes == (uint64_t{8} << 30));
}

TEST_CASE("help and version exit early", "[cpu]") {
  auto h = Parse({"--help"});
  REQUIRE(h.ok());
  CHECK(h->exit_now);
  CHECK_THAT(h->message, Catch::Contains("--lease_timeout_ms"));
  auto v = Parse({"--version"});
  REQUIRE(v.ok());
  CHECK_THAT(v->message, Catch::Contains("cachemgrd"));
}

}  // namespace
}  // namespace cachemgr
