// The client side of leases and daemon restarts, against the real cachemgrd and real client
// processes: a client stalled (SIGSTOP) past its lease cannot write into the blocks the daemon
// gave to another client; a session reports a SIGKILLed daemon, every call failing promptly,
// and re-attaches on its own when the daemon is back (a token of the earlier boot is refused as
// such); a client workload keeps going through a daemon SIGKILL and restart with right books
// and digests.
#include <signal.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <regex>
#include <set>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "cachemgr/client/client.h"
#include "cachemgr/kernels/kv_digest.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

// The value of `"key":` in a one-line JSON object: a string's contents, or a number/bool token.
std::string JsonField(const std::string& json, const std::string& key) {
  std::smatch m;
  if (std::regex_search(json, m, std::regex("\"" + key + "\":\"((?:[^\"\\\\]|\\\\.)*)\""))) {
    return m[1];
  }
  if (std::regex_search(json, m, std::regex("\"" + key + "\":([-0-9a-z.]+)"))) return m[1];
  return "";
}

uint64_t JsonU64(const std::string& json, const std::string& key) {
  const std::string v = JsonField(json, key);
  return v.empty() ? ~uint64_t{0} : std::stoull(v);
}

std::vector<uint32_t> JsonU32s(const std::string& json, const std::string& key) {
  std::vector<uint32_t> out;
  std::smatch m;
  if (!std::regex_search(json, m, std::regex("\"" + key + "\":\\[([0-9,]*)\\]"))) return out;
  const std::string body = m[1];
  const std::regex number("[0-9]+");
  for (auto it = std::sregex_iterator(body.begin(), body.end(), number);
       it != std::sregex_iterator(); ++it) {
    out.push_back(static_cast<uint32_t>(std::stoul(it->str())));
  }
  return out;
}

// Lines of `child` until one whose "event" is `event` (returned); every line read goes to `seen`.
std::string ReadUntilEvent(ChildProcess& child, const std::string& event, absl::Duration timeout,
                           std::vector<std::string>* seen) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    absl::StatusOr<std::string> line = child.ReadLine(deadline - absl::Now());
    INFO("waiting for event " << event);
    REQUIRE(line.ok());
    seen->push_back(*line);
    if (JsonField(*line, "event") == event) return *line;
    REQUIRE(JsonField(*line, "error").empty());
  }
}

// The kv client's model (its flag defaults) under another name.
client::AttachOptions KvClientModel(const std::string& name, uint32_t num_blocks) {
  client::AttachOptions options;
  options.client_name = "test";
  options.model.name = name;
  options.model.num_layers = 5;
  options.model.num_q_heads = 8;
  options.model.num_kv_heads = 4;
  options.model.head_dim = 8;
  options.model.dtype = client::DType::kFp32;
  options.num_blocks = num_blocks;
  return options;
}

// Fills every row of `alloc` with bytes of `seed`; returns the daemon's per-layer digests after
// checking they match what this process reads.
std::vector<uint64_t> WriteAndDigest(client::Session& session, const std::string& sequence,
                                     const client::Allocation& alloc, uint8_t seed) {
  const client::KvPoolView& pool = session.pool();
  const kernels::KvLayerLayout& layout = pool.layout();
  for (const client::LayerAllocation& layer : alloc.layers) {
    for (size_t i = 0; i < layer.slot_mapping.size(); ++i) {
      std::byte* k = pool.key_at_slot<std::byte>(layer.layer, layer.slot_mapping[i]);
      std::byte* v = pool.value_at_slot<std::byte>(layer.layer, layer.slot_mapping[i]);
      for (size_t b = 0; b < layout.token_bytes(); ++b) {
        k[b] = std::byte(static_cast<uint8_t>(seed + i + b + layer.layer));
        v[b] = std::byte(static_cast<uint8_t>(seed * 3 + i + b));
      }
    }
  }
  auto info = session.GetSequence(sequence, /*include_kv_digest=*/true);
  REQUIRE(info.ok());
  std::vector<uint64_t> digests;
  for (const client::LayerBlockTable& t : info->layers) {
    CHECK(t.kv_digest == kernels::DigestLayerTokens(layout, pool.layer_base(t.layer),
                                                    t.block_ids.data(), t.num_tokens));
    digests.push_back(t.kv_digest);
  }
  return digests;
}

TEST_CASE("a client stalled past its lease cannot write into blocks given to another client",
          "[service]") {
  auto daemon = DaemonProcess::Start({"--heartbeat_interval_ms=100", "--lease_timeout_ms=1000"});
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  auto stub = RawStub(socket);
  // The other tenant attaches first and keeps the pool (4 blocks per layer) alive throughout.
  auto other = client::Session::Attach(socket, KvClientModel("stall", 4));
  REQUIRE(other.ok());

  // The stalling client takes the whole pool: 64 tokens = 4 blocks in each of 5 layers.
  auto child =
      ChildProcess::Spawn(KvClientPath(), {"--socket=" + socket, "--mode=stall", "--model=stall",
                                           "--num_blocks=4", "--tokens=64", "--seed=7"});
  REQUIRE(child.ok());
  std::vector<std::string> lines;
  auto first = (*child)->ReadLine(absl::Seconds(20));
  REQUIRE(first.ok());
  INFO(*first);
  const std::vector<uint32_t> stalled_blocks = JsonU32s(*first, "block_ids");
  REQUIRE(stalled_blocks.size() == 4);
  CHECK(UsedBlocks(*stub) == 20);

  // Stop it (heartbeat thread included) until the daemon expired it.
  REQUIRE((*child)->Kill(SIGSTOP).ok());
  absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (UsedBlocks(*stub) != 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(50));
  REQUIRE(UsedBlocks(*stub) == 0);

  // The other tenant gets those blocks (retrying while a daemon may still hold them back) and
  // writes its own KV.
  absl::StatusOr<client::Allocation> alloc;
  deadline = absl::Now() + absl::Seconds(30);
  do {
    alloc = (*other)->Allocate("victim", 64);
    if (!alloc.ok()) absl::SleepFor(absl::Milliseconds(100));
  } while (!alloc.ok() && alloc.status().code() == absl::StatusCode::kResourceExhausted &&
           absl::Now() < deadline);
  REQUIRE(alloc.ok());
  CHECK(std::set<uint32_t>(alloc->layers[0].new_block_ids.begin(),
                           alloc->layers[0].new_block_ids.end()) ==
        std::set<uint32_t>(stalled_blocks.begin(), stalled_blocks.end()));
  const std::vector<uint64_t> before = WriteAndDigest(**other, "victim", *alloc, 99);

  // Resume it: its heartbeat thread finds the lease past due and revokes the mapping first.
  REQUIRE((*child)->Kill(SIGCONT).ok());
  const std::string lost = ReadUntilEvent(**child, "lost", absl::Seconds(30), &lines);
  INFO(lost);
  CHECK(JsonField(lost, "generation") == "1");
  CHECK_THAT(JsonField(lost, "status"), Catch::StartsWith("ABORTED: "));
  // Now it stores through its stale pointers, then calls.
  REQUIRE((*child)->Kill(SIGUSR1).ok());
  const std::string after = ReadUntilEvent(**child, "after_stall", absl::Seconds(30), &lines);
  INFO(after);
  CHECK(JsonField(after, "lease_ok") == "false");
  CHECK(JsonField(after, "revoked") == "true");
  CHECK_THAT(JsonField(after, "call"), Catch::StartsWith("ABORTED: "));
  CHECK_THAT(JsonField(after, "call"), Catch::Contains("Reattach()"));
  auto code = (*child)->Wait(absl::Seconds(30));
  REQUIRE(code.ok());
  CHECK(*code == 0);

  // The other tenant's KV is untouched.
  auto info = (*other)->GetSequence("victim", /*include_kv_digest=*/true);
  REQUIRE(info.ok());
  std::vector<uint64_t> now;
  for (const client::LayerBlockTable& t : info->layers) now.push_back(t.kv_digest);
  CHECK(now == before);
  REQUIRE((*other)->Free("victim").ok());
  CHECK(UsedBlocks(*stub) == 0);
  CHECK(AccountingBalances(*stub));
}

TEST_CASE("a session reports a daemon restart, then re-attaches on its own", "[service]") {
  // A lease long enough that the restart, not the lease, ends the session.
  auto daemon = DaemonProcess::Start({"--heartbeat_interval_ms=100", "--lease_timeout_ms=30000"});
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  absl::Mutex mu;
  std::vector<client::SessionEvent> events;
  client::AttachOptions options = KvClientModel("restart", 16);
  options.on_event = [&](const client::SessionEvent& e) {
    absl::MutexLock lock(&mu);
    events.push_back(e);
  };
  auto session = client::Session::Attach(socket, options);
  REQUIRE(session.ok());
  client::Session& s = **session;
  CHECK(s.generation() == 1);
  CHECK(s.boot_id().size() == 16);
  const std::string old_boot = s.boot_id();
  REQUIRE(s.Allocate("s", 20).ok());
  CHECK(s.lease_ok());
  CHECK(s.status().ok());
  CHECK_FALSE(s.mapping_revoked_at().has_value());
  auto alive = s.Reattach();
  CHECK(alive.status().code() == absl::StatusCode::kFailedPrecondition);

  REQUIRE((*daemon)->Terminate(SIGKILL).ok());
  // The daemon is gone: calls fail at once with UNAVAILABLE (not after their deadline).
  CHECK(s.Allocate("t", 1).status().code() == absl::StatusCode::kUnavailable);
  CHECK(s.GetSequence("s").status().code() == absl::StatusCode::kUnavailable);

  REQUIRE((*daemon)->Restart().ok());
  // The heartbeat thread hears "earlier boot", revokes the mapping and reports the loss...
  absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (s.lease_ok() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(20));
  REQUIRE_FALSE(s.lease_ok());
  const absl::Status why = s.status();
  INFO(why.ToString());
  CHECK(why.code() == absl::StatusCode::kAborted);
  CHECK_THAT(std::string(why.message()),
             Catch::Contains("from an earlier cachemgrd (boot " + old_boot));
  CHECK(s.mapping_revoked_at().has_value());
  CHECK(s.Allocate("s", 1).status() == why);  // every call, without reaching the daemon
  // ...then attaches a new session in the background.
  deadline = absl::Now() + absl::Seconds(30);
  auto ready = [&] {
    absl::MutexLock lock(&mu);
    return std::any_of(events.begin(), events.end(), [](const client::SessionEvent& e) {
      return e.kind == client::SessionEvent::Kind::kReady;
    });
  };
  while (!ready() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(20));
  REQUIRE(ready());
  {
    absl::MutexLock lock(&mu);
    REQUIRE(events.size() >= 2);
    CHECK(events[0].kind == client::SessionEvent::Kind::kLost);
    CHECK(events[0].generation == 1);
    CHECK(events[0].status == why);
    CHECK(events[1].generation == 2);
  }
  CHECK(s.Allocate("s", 1).status() == why);  // until the engine adopts it

  auto generation = s.Reattach();
  REQUIRE(generation.ok());
  CHECK(*generation == 2);
  CHECK(s.generation() == 2);
  CHECK(s.lease_ok());
  CHECK(s.boot_id() != old_boot);
  CHECK_FALSE(s.mapping_revoked_at().has_value());
  // The old sequence is gone; a new one works end to end in the new pool.
  CHECK(s.GetSequence("s").status().code() == absl::StatusCode::kNotFound);
  auto alloc = s.Allocate("s", 20);
  REQUIRE(alloc.ok());
  CHECK(alloc->created);
  WriteAndDigest(s, "s", *alloc, 5);
  auto stats = client::GetStats(socket);
  REQUIRE(stats.ok());
  CHECK(stats->clients.size() == 1);

  // A token of the earlier boot is refused with a precise status.
  auto stub = RawStub(socket);
  grpc::ClientContext ctx;
  v1::HeartbeatRequest beat;
  beat.set_session_token(old_boot + ".00000000000000000000000000000000");
  v1::HeartbeatResponse left;
  const grpc::Status refused = stub->Heartbeat(&ctx, beat, &left);
  CHECK(refused.error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  CHECK_THAT(refused.error_message(),
             Catch::Contains("session_token is from an earlier cachemgrd (boot " + old_boot));
  CHECK_THAT(refused.error_message(), Catch::Contains("re-attach"));

  REQUIRE(s.Detach().ok());
  stats = client::GetStats(socket);
  REQUIRE(stats.ok());
  CHECK(stats->clients.empty());
}

TEST_CASE("without a heartbeat thread, lease_ok() revokes and Reattach() attaches", "[service]") {
  auto daemon = DaemonProcess::Start({"--heartbeat_interval_ms=100", "--lease_timeout_ms=1500"});
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  auto keeper = client::Session::Attach(socket, KvClientModel("quiet", 4));  // keeps the pool
  REQUIRE(keeper.ok());
  client::AttachOptions options = KvClientModel("quiet", 4);
  options.auto_heartbeat = false;
  int lost_events = 0;
  options.on_event = [&](const client::SessionEvent& e) {
    if (e.kind == client::SessionEvent::Kind::kLost) ++lost_events;
  };
  auto session = client::Session::Attach(socket, options);
  REQUIRE(session.ok());
  client::Session& s = **session;
  auto alloc = s.Allocate("s", 64);  // the whole pool
  REQUIRE(alloc.ok());
  float* row = s.pool().key_at_slot<float>(0, alloc->layers[0].slot_mapping[0]);
  row[0] = 1.5f;
  // Silent past its lease: the first lease_ok() finds the deadline passed and revokes.
  absl::SleepFor(absl::Milliseconds(2000));
  CHECK_FALSE(s.lease_ok());
  CHECK(s.mapping_revoked_at().has_value());
  CHECK(lost_events == 1);
  CHECK(row[0] == 0.0f);  // private memory now
  const absl::Status why = s.status();
  CHECK(why.code() == absl::StatusCode::kAborted);
  CHECK_THAT(std::string(why.message()), Catch::StartsWith("lease expired at "));
  CHECK_THAT(std::string(why.message()),
             Catch::Contains("the daemon reclaimed this client's blocks"));
  CHECK(s.Heartbeat().status() == why);
  // The keeper gets the blocks; the stale pointer cannot touch them.
  absl::StatusOr<client::Allocation> mine;
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  do {
    mine = (*keeper)->Allocate("k", 64);
    if (!mine.ok()) absl::SleepFor(absl::Milliseconds(50));
  } while (!mine.ok() && absl::Now() < deadline);
  REQUIRE(mine.ok());
  const std::vector<uint64_t> before = WriteAndDigest(**keeper, "k", *mine, 42);
  row[0] = 2.5f;
  auto info = (*keeper)->GetSequence("k", /*include_kv_digest=*/true);
  REQUIRE(info.ok());
  for (size_t l = 0; l < before.size(); ++l) CHECK(info->layers[l].kv_digest == before[l]);
  // Nothing was attached in the background: Reattach() attaches now.
  auto generation = s.Reattach();
  REQUIRE(generation.ok());
  CHECK(*generation == 2);
  CHECK(s.lease_ok());
  CHECK(s.Heartbeat().ok());
  REQUIRE((*keeper)->Free("k").ok());
  auto again = s.Allocate("s", 16);
  REQUIRE(again.ok());
  CHECK(again->created);
}

TEST_CASE("a client workload survives a daemon SIGKILL and restart under load", "[service]") {
  auto daemon = DaemonProcess::Start({"--heartbeat_interval_ms=100", "--lease_timeout_ms=2000"});
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  auto child = ChildProcess::Spawn(
      KvClientPath(), {"--socket=" + socket, "--mode=loop", "--model=workload", "--num_blocks=64",
                       "--live=4", "--until_generation=2", "--ops_after=30", "--seconds=120"});
  REQUIRE(child.ok());
  std::vector<std::string> lines;
  // Under way: allocating, writing, checking and freeing.
  std::string progress;
  do {
    progress = ReadUntilEvent(**child, "progress", absl::Seconds(60), &lines);
  } while (JsonU64(progress, "ops") < 20);

  REQUIRE((*daemon)->Terminate(SIGKILL).ok());
  absl::SleepFor(absl::Milliseconds(300));  // the workload meets the outage
  REQUIRE((*daemon)->Restart().ok());

  const std::string done = ReadUntilEvent(**child, "done", absl::Seconds(90), &lines);
  std::string all;
  for (const std::string& l : lines) all += l + "\n";
  INFO(all);
  auto code = (*child)->Wait(absl::Seconds(30));
  REQUIRE(code.ok());
  CHECK(*code == 0);
  // It reported the outage, re-attached by itself, and went on in the new session.
  auto index_of = [&](const std::string& event) {
    for (size_t i = 0; i < lines.size(); ++i) {
      if (JsonField(lines[i], "event") == event) return i;
    }
    return lines.size();
  };
  CHECK(index_of("outage") < index_of("reattached"));
  REQUIRE(index_of("reattached") < lines.size());
  CHECK(JsonField(lines[index_of("reattached")], "generation") == "2");
  CHECK(JsonField(done, "generation") == "2");
  CHECK(JsonU64(done, "ops") >= 50);
  CHECK(JsonU64(done, "digest_mismatches") == 0);
  CHECK(JsonU64(done, "live_sequences") == 4);
  // The new daemon's books match what the workload holds.
  CHECK(JsonU64(done, "used_blocks") == JsonU64(done, "live_blocks"));
  CHECK(JsonU64(done, "live_blocks") > 0);
  // It detached: nothing is left.
  auto stub = RawStub(socket);
  CHECK(UsedBlocks(*stub) == 0);
  CHECK(AccountingBalances(*stub));
  auto stats = client::GetStats(socket);
  REQUIRE(stats.ok());
  CHECK(stats->clients.empty());
  CHECK(stats->pools.empty());
}

}  // namespace
}  // namespace cachemgr::testing
