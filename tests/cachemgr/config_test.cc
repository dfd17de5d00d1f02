#include "cachemgr/config.h"

#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>

#include "absl/strings/str_format.h"
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
  CHECK(p->config.operator_token_file == "/tmp/x.sock.operator");
  CHECK(p->config.allowed_uids.empty());
  CHECK_FALSE(p->config.socket_gid.has_value());
  CHECK(p->config.manager.max_clients == 1024);
  CHECK(p->config.tcp_address.empty());
}

TEST_CASE("secret files others can read or change are refused, naming file and mode", "[cpu]") {
  testing::TempDir dir;
  const std::string token = dir.file("token");
  { std::ofstream(token) << "0123456789abcdef0123\n"; }
  const std::vector<std::string> tcp = {"--tcp_address=127.0.0.1:0", "--tcp_plaintext_loopback",
                                        "--tcp_token_file=" + token};
  for (const mode_t mode : {0644, 0640, 0604, 0620}) {
    REQUIRE(::chmod(token.c_str(), mode) == 0);
    auto p = Parse(tcp);
    CAPTURE(mode);
    REQUIRE(p.status().code() == absl::StatusCode::kFailedPrecondition);
    CHECK_THAT(std::string(p.status().message()),
               Catch::Contains("--tcp_token_file") && Catch::Contains(token) &&
                   Catch::Contains(absl::StrFormat("mode %04o", mode)));
  }
  REQUIRE(::chmod(token.c_str(), 0600) == 0);
  auto ok = Parse(tcp);
  REQUIRE(ok.ok());
  CHECK(ok->config.tcp_token == "0123456789abcdef0123");

  const std::string key = dir.file("key.pem");
  { std::ofstream(key) << "not really a key\n"; }
  REQUIRE(::chmod(key.c_str(), 0644) == 0);
  auto key_refused = Parse({"--tcp_address=0.0.0.0:0", "--tls_cert_file=" + key,
                            "--tls_key_file=" + key, "--tcp_token_file=" + token});
  REQUIRE(key_refused.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(key_refused.status().message()),
             Catch::Contains("--tls_key_file") && Catch::Contains("mode 0644"));
}

TEST_CASE("access flags: users and groups by name or number, TLS without a token", "[cpu]") {
  auto p = Parse({"--socket=/tmp/x.sock", "--allowed_uids=root, 1234", "--socket_group=4242",
                  "--operator_group=root", "--operator_token_file=/tmp/op"});
  REQUIRE(p.ok());
  CHECK(p->config.allowed_uids == std::vector<uid_t>{0, 1234});
  CHECK(p->config.socket_gid == std::optional<gid_t>(4242));
  CHECK(p->config.operator_gid == std::optional<gid_t>(0));
  CHECK(p->config.operator_token_file == "/tmp/op");
  // Mutual TLS authenticates by certificate: no token file needed.
  testing::TempDir dir;
  const std::string key = dir.file("key.pem");
  { std::ofstream(key) << "k\n"; }
  REQUIRE(::chmod(key.c_str(), 0600) == 0);
  auto mtls = Parse({"--tcp_address=0.0.0.0:0", "--tls_cert_file=/c", "--tls_key_file=" + key,
                     "--tls_client_ca_file=/ca"});
  REQUIRE(mtls.ok());
  CHECK(mtls->config.tcp_token.empty());
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
  // The invariant checks are off unless asked for.
  CHECK(p->config.check_invariants_interval == absl::ZeroDuration());
  auto checked = Parse({"--check_invariants_ms=250"});
  REQUIRE(checked.ok());
  CHECK(checked->config.check_invariants_interval == absl::Milliseconds(250));
}

TEST_CASE("bad flags are named", "[cpu]") {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--bogus=1"}, "unknown flag --bogus"},
      {{"stray"}, "unexpected argument \"stray\""},
      {{"--memory_budget=lots"}, "--memory_budget must be a byte count"},
      {{"--lease_timeout_ms=100", "--heartbeat_interval_ms=200"}, "--lease_timeout_ms (100)"},
      {{"--default_block_size=0"}, "--default_block_size must be an integer in [1, 1024]"},
      {{"--tcp_address=127.0.0.1:5000"}, "--tcp_address needs TLS"},
      {{"--tcp_address=127.0.0.1:5000", "--tcp_plaintext_loopback"},
       "--tcp_address needs --tcp_token_file"},
      {{"--tcp_address=10.1.2.3:5000", "--tcp_plaintext_loopback"},
       "--tcp_plaintext_loopback needs a loopback --tcp_address"},
      {{"--tcp_address=127.0.0.1:5000", "--tls_cert_file=/x"}, "go together"},
      {{"--tls_cert_file=/x", "--tls_key_file=/y"}, "only apply with --tcp_address"},
      {{"--allowed_uids=no-such-user-here"}, "--allowed_uids: no user"},
      {{"--socket_group=no-such-group-here"}, "--socket_group: no group"},
      {{"--max_connections=0"}, "--max_connections must be an integer"},
      {{"--socket=/tmp/" + std::string(120, 'x')}, "--socket is"},
      {{"--reflection=maybe"}, "--reflection must be true or false"},
      {{"--log_level=loud"}, "--log_level must be debug"},
      {{"--socket"}, "--socket needs a value"},
      {{"--quarantine_ms=5000"}, "--quarantine_ms (5000) must be at least --lease_timeout_ms"},
      {{"--quarantine_ms=0"}, "--quarantine_ms must be an integer in [1, "},
      {{"--max_reply_bytes=1K"}, "--max_reply_bytes must be a byte count in [64K, 1G]"},
      {{"--max_reply_bytes=2G"}, "--max_reply_bytes must be a byte count in [64K, 1G]"},
      {{"--check_invariants_ms=often"}, "--check_invariants_ms must be an integer in [0, "},
  };
  for (const auto& [args, message] : cases) {
    INFO(message);
    auto p = Parse(args);
    REQUIRE(p.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(p.status().message()), Catch::Contains(message));
  }
}

TEST_CASE("row links: auto resolves by backend, each kind's needs are named", "[cpu]") {
  testing::TempDir dir;
  const std::string token = dir.file("token");
  { std::ofstream(token) << "0123456789abcdef0123\n"; }
  REQUIRE(::chmod(token.c_str(), 0600) == 0);
  const auto with_tcp = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = {"--tcp_address=127.0.0.1:0", "--tcp_plaintext_loopback",
                                     "--tcp_token_file=" + token};
    args.insert(args.end(), extra.begin(), extra.end());
    return Parse(args);
  };
  auto p = with_tcp({});
  REQUIRE(p.ok());
  CHECK(p->config.row_links.empty());  // auto on the host backend: none
  CHECK(p->config.row_link_chunk_bytes == (uint64_t{64} << 20));
  p = with_tcp({"--row_links=socket", "--row_link_host=127.0.0.1", "--row_link_chunk_bytes=4096"});
  REQUIRE(p.ok());
  CHECK(p->config.row_links == std::vector<std::string>{"socket"});
  CHECK(p->config.row_link_host == "127.0.0.1");
  CHECK(p->config.row_link_chunk_bytes == 4096);
  p = with_tcp({"--row_links="});
  REQUIRE(p.ok());
  CHECK(p->config.row_links.empty());

  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--row_links=socket", "--row_link_host=h"}, "--row_links needs --tcp_address"},
      {{"--row_links=socket"}, "--row_links=socket needs --row_link_host"},
      {{"--row_links=socket", "--row_link_host=0.0.0.0"}, "(not a wildcard)"},
      {{"--row_links=nccl"}, "--row_links=nccl needs --backend=cuda"},
      {{"--row_link_host=127.0.0.1"}, "--row_link_host only applies with --row_links=socket"},
      {{"--row_links=pigeon"}, "--row_links must list nccl, socket or auto"},
      {{"--row_links=socket,socket"}, "--row_links names socket twice"},
      {{"--row_links=auto,socket"}, "--row_links auto stands alone"},
      {{"--row_link_chunk_bytes=10"}, "--row_link_chunk_bytes must be an integer in [4096, "},
  };
  for (const auto& [extra, message] : cases) {
    INFO(message);
    auto bad = extra.front() == "--row_links=socket" && extra.size() == 2 &&
                       extra[1] == "--row_link_host=h"
                   ? Parse(extra)
                   : with_tcp(extra);
    REQUIRE(bad.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(bad.status().message()), Catch::Contains(message));
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
