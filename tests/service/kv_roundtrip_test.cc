// Separate client processes write KV through the mapped pool; the daemon reads the same bytes
// back (digests). A client killed with SIGKILL loses its blocks when its lease runs out.
#include <catch2/catch.hpp>
#include <regex>

#include "cachemgr/client/client.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

std::vector<std::string> JsonStrings(const std::string& json, const std::string& key) {
  std::vector<std::string> out;
  const std::regex array("\"" + key + "\":\\[([^\\]]*)\\]");
  std::smatch m;
  if (!std::regex_search(json, m, array)) return out;
  const std::string body = m[1];
  const std::regex item("\"([^\"]*)\"");
  for (auto it = std::sregex_iterator(body.begin(), body.end(), item); it != std::sregex_iterator();
       ++it) {
    out.push_back((*it)[1]);
  }
  return out;
}

std::string RunKvClient(const DaemonProcess& daemon, std::vector<std::string> args) {
  args.insert(args.begin(), "--socket=" + daemon.socket_path());
  auto child = ChildProcess::Spawn(KvClientPath(), args);
  REQUIRE(child.ok());
  auto line = (*child)->ReadLine(absl::Seconds(20));
  REQUIRE(line.ok());
  auto code = (*child)->Wait(absl::Seconds(20));
  REQUIRE(code.ok());
  CHECK(*code == 0);
  return *line;
}

TEST_CASE("KV written by a client process is what the daemon reads back", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  for (const std::string layout : {"fa", "fi"}) {
    for (const std::string dtype : {"fp32", "fp16"}) {
      INFO(layout << " " << dtype);
      const std::string json =
          RunKvClient(**daemon, {"--layout=" + layout, "--dtype=" + dtype, "--tokens=37",
                                 "--seed=5", "--model=m-" + layout + "-" + dtype});
      INFO(json);
      const auto local = JsonStrings(json, "local_digests");
      const auto remote = JsonStrings(json, "daemon_digests");
      REQUIRE(local.size() == 5);
      CHECK(local == remote);
      // Every layer got different bytes, so no two digests agree.
      CHECK(std::set<std::string>(local.begin(), local.end()).size() == 5);
    }
  }
  // Another seed writes other bytes: the digests move with the data.
  const auto a = JsonStrings(RunKvClient(**daemon, {"--seed=1"}), "daemon_digests");
  const auto b = JsonStrings(RunKvClient(**daemon, {"--seed=2"}), "daemon_digests");
  REQUIRE(a.size() == 5);
  CHECK(a != b);
  // Every client detached: nothing is held.
  auto stub = RawStub((*daemon)->socket_path());
  CHECK(UsedBlocks(*stub) == 0);
}

TEST_CASE("a client killed with SIGKILL gets its blocks reclaimed by lease expiry", "[service]") {
  auto daemon = DaemonProcess::Start({"--heartbeat_interval_ms=100", "--lease_timeout_ms=600"});
  REQUIRE(daemon.ok());
  auto stub = RawStub((*daemon)->socket_path());
  auto child = ChildProcess::Spawn(
      KvClientPath(), {"--socket=" + (*daemon)->socket_path(), "--tokens=40", "--hold"});
  REQUIRE(child.ok());
  auto line = (*child)->ReadLine(absl::Seconds(20));
  REQUIRE(line.ok());
  INFO(*line);
  // 40 tokens in blocks of 16 = 3 blocks in each of 5 layers.
  CHECK(UsedBlocks(*stub) == 15);
  auto all = client::ListAllSequences((*daemon)->socket_path());
  REQUIRE(all.ok());
  REQUIRE(all->size() == 1);
  CHECK((*all)[0].num_blocks == 15);

  REQUIRE((*child)->Kill(SIGKILL).ok());
  REQUIRE((*child)->Wait(absl::Seconds(5)).ok());
  // Still held right after the crash...
  CHECK(UsedBlocks(*stub) == 15);
  // ...and back once the lease (600 ms) ran out.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (UsedBlocks(*stub) != 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(50));
  CHECK(UsedBlocks(*stub) == 0);
  CHECK(AccountingBalances(*stub));
  // The blocks wait out the quarantine (--quarantine_ms, by default the lease timeout: the
  // client might only be stalled); then they are free and the clientless pool goes.
  auto stats = client::GetStats((*daemon)->socket_path());
  while (stats.ok() && !stats->pools.empty() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(50));
    stats = client::GetStats((*daemon)->socket_path());
  }
  REQUIRE(stats.ok());
  CHECK(stats->clients.empty());
  CHECK(stats->pools.empty());
  CHECK_THAT((*daemon)->log_contents(), Catch::Contains("client lease expired"));
  CHECK_THAT((*daemon)->log_contents(), Catch::Contains("quarantine ended"));
}

TEST_CASE("a heartbeating client keeps its blocks past the lease timeout", "[service]") {
  auto daemon = DaemonProcess::Start({"--heartbeat_interval_ms=100", "--lease_timeout_ms=500"});
  REQUIRE(daemon.ok());
  client::AttachOptions options;
  options.client_name = "alive";
  options.model.name = "m";
  options.model.num_layers = 2;
  options.model.num_q_heads = 2;
  options.model.num_kv_heads = 2;
  options.model.head_dim = 8;
  options.num_blocks = 8;
  auto session = client::Session::Attach((*daemon)->socket_path(), options);
  REQUIRE(session.ok());
  CHECK((*session)->heartbeat_interval_ms() == 100);
  REQUIRE((*session)->Allocate("s", 5).ok());
  absl::SleepFor(absl::Milliseconds(1500));
  auto seq = (*session)->GetSequence("s");
  REQUIRE(seq.ok());
  CHECK(seq->num_positions == 5);
}

}  // namespace
}  // namespace cachemgr::testing
