// CacheManager leases and the pool lifecycle on a fake clock: an expired client's blocks wait
// out a quarantine before anyone else gets them, pools are built outside the manager's lock
// (another client's calls go on meanwhile), and a lease is judged by when a call arrived.
#include <atomic>
#include <catch2/catch.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "cachemgr/cache_manager.h"
#include "tests/cachemgr/gated_backend.h"

namespace cachemgr {
namespace {

ModelSpec Model(const std::string& name = "m") {
  ModelSpec m;
  m.name = name;
  m.num_layers = 2;
  m.num_q_heads = 2;
  m.num_kv_heads = 1;
  m.head_dim = 8;
  m.dtype = DType::kFp16;
  m.block_size = 4;
  return m;
}

CacheManagerOptions Options() {
  CacheManagerOptions o;
  o.lease_timeout = absl::Seconds(10);
  o.quarantine = absl::Seconds(30);
  return o;
}

// A host backend whose CreatePool blocks, for pools of one model name, until released; and
// that can be told to fail instead.
class BlockingBackend final : public testing::HostBackendWrapper {
 public:
  explicit BlockingBackend(std::string blocked_model) : blocked_(std::move(blocked_model)) {}

  absl::StatusOr<std::unique_ptr<PoolMemory>> CreatePool(const std::string& pool_id,
                                                         const kernels::KvLayerLayout& layout,
                                                         kernels::KvElemType type,
                                                         uint32_t num_layers) override {
    if (pool_id.rfind(blocked_ + "-", 0) == 0) {
      ++builds_;
      if (!entered_.HasBeenNotified()) entered_.Notify();
      release_.WaitForNotification();
      if (fail_) return absl::ResourceExhaustedError("the device is out of memory");
    }
    return host().CreatePool(pool_id, layout, type, num_layers);
  }

  absl::Notification& entered() { return entered_; }
  void Release(bool fail = false) {
    fail_ = fail;
    release_.Notify();
  }
  void set_fail(bool fail) { fail_ = fail; }
  int builds() const { return builds_.load(); }

 private:
  const std::string blocked_;
  absl::Notification entered_, release_;
  std::atomic<bool> fail_{false};
  std::atomic<int> builds_{0};
};

struct Fixture {
  explicit Fixture(CacheManagerOptions options = Options())
      : manager(options, &backend, &clock, nullptr) {}

  AttachResult Attach(const std::string& name, uint32_t num_blocks = 8) {
    auto r = manager.Attach({name, Model(), num_blocks});
    REQUIRE(r.ok());
    return *r;
  }
  LayerOccupancy Layer0() { return manager.Stats().pools.at(0).layers.at(0); }

  HostBackend backend;
  FakeClock clock;
  CacheManager manager;
};

std::set<uint32_t> Blocks(const AllocateResult& r) {
  return std::set<uint32_t>(r.layers[0].new_block_ids.begin(), r.layers[0].new_block_ids.end());
}

TEST_CASE("an expired client's blocks are quarantined, then free again", "[cpu]") {
  Fixture f;
  const AttachResult a = f.Attach("a");
  const AttachResult b = f.Attach("b");
  auto held = f.manager.Allocate(a.session_token, "sa", 16);  // 4 of 8 blocks per layer
  REQUIRE(held.ok());
  const std::set<uint32_t> a_blocks = Blocks(*held);

  f.clock.Advance(absl::Seconds(6));
  REQUIRE(f.manager.Heartbeat(b.session_token).ok());
  f.clock.Advance(absl::Seconds(5));
  REQUIRE(f.manager.ExpireLeases() == std::vector<std::string>{a.client_id});
  LayerOccupancy l = f.Layer0();
  CHECK(l.quarantined_blocks == 4);
  CHECK(l.free_blocks == 4);
  CHECK(l.used_blocks == 0);
  REQUIRE(f.manager.CheckInvariants().ok());

  // b gets everything that is free, and none of a's blocks.
  CHECK(f.manager.Allocate(b.session_token, "sb", 17).status().code() ==
        absl::StatusCode::kResourceExhausted);
  auto got = f.manager.Allocate(b.session_token, "sb", 16);
  REQUIRE(got.ok());
  for (uint32_t block : Blocks(*got)) CHECK_FALSE(a_blocks.contains(block));

  // Just before the quarantine ends nothing changes; at its end the reaper frees them.
  f.clock.Advance(absl::Seconds(9));
  REQUIRE(f.manager.Heartbeat(b.session_token).ok());
  f.clock.Advance(absl::Seconds(9));
  REQUIRE(f.manager.Heartbeat(b.session_token).ok());
  f.clock.Advance(absl::Seconds(9));
  REQUIRE(f.manager.Heartbeat(b.session_token).ok());
  f.clock.Advance(absl::Seconds(2));  // 29 s after the expiry
  f.manager.ExpireLeases();
  CHECK(f.Layer0().quarantined_blocks == 4);
  f.clock.Advance(absl::Seconds(1));
  f.manager.ExpireLeases();
  CHECK(f.Layer0().quarantined_blocks == 0);
  CHECK(f.Layer0().free_blocks == 4);
  auto reused = f.manager.Allocate(b.session_token, "sb2", 16);
  REQUIRE(reused.ok());
  CHECK(Blocks(*reused) == a_blocks);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("Detach and a client's own Free release at once; an operator Free quarantines", "[cpu]") {
  Fixture f;
  const AttachResult a = f.Attach("a");
  const AttachResult b = f.Attach("b");
  REQUIRE(f.manager.Allocate(a.session_token, "s", 32).ok());  // all 8 blocks
  REQUIRE(f.manager.Free(a.session_token, "s").ok());
  CHECK(f.Layer0().free_blocks == 8);
  REQUIRE(f.manager.Allocate(a.session_token, "s", 32).ok());
  REQUIRE(f.manager.Detach(a.session_token).ok());
  CHECK(f.Layer0().free_blocks == 8);
  REQUIRE(f.manager.Allocate(b.session_token, "t", 32).ok());

  // The operator takes b's sequence while b may still write to it.
  Caller op;
  op.operator_credential = true;
  auto released = f.manager.Free(op, "t");
  REQUIRE(released.ok());
  CHECK(*released == 16);
  CHECK(f.Layer0().quarantined_blocks == 8);
  CHECK(f.manager.Allocate(b.session_token, "u", 1).status().code() ==
        absl::StatusCode::kResourceExhausted);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("a pool whose last client expired keeps its memory until the quarantine ends", "[cpu]") {
  Fixture f;
  const AttachResult a = f.Attach("a");
  REQUIRE(f.manager.Allocate(a.session_token, "s", 5).ok());
  const StatsSnapshot before = f.manager.Stats();
  f.clock.Advance(absl::Seconds(10));
  // A late call of its own expires it too (and quarantines like the reaper).
  CHECK(f.manager.Heartbeat(a.session_token).status().code() == absl::StatusCode::kNotFound);
  StatsSnapshot s = f.manager.Stats();
  REQUIRE(s.pools.size() == 1);
  CHECK(s.pools[0].clients == 0);
  CHECK(s.pools[0].layers[1].quarantined_blocks == 2);
  CHECK(s.memory_used_bytes ==
        before.memory_used_bytes - before.input_buffer_bytes - before.sequence_bytes);
  CHECK(s.sequence_bytes == 0);
  REQUIRE(f.manager.CheckInvariants().ok());

  // Meanwhile the model's name stays taken: the same description shares the held pool...
  const AttachResult c = f.Attach("c");
  CHECK(c.pool.pool_id == a.pool.pool_id);
  ModelSpec other = Model();
  other.head_dim = 16;
  auto refused = f.manager.Attach({"d", other, 8});
  REQUIRE(refused.status().code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(f.manager.Detach(c.session_token).ok());
  // ... and another description is told why.
  refused = f.manager.Attach({"d", other, 8});
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains("quarantined"));

  f.clock.Advance(absl::Seconds(30));
  f.manager.ExpireLeases();
  CHECK(f.manager.Stats().pools.empty());
  CHECK(f.manager.Stats().memory_used_bytes == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("shutdown releases pools held by quarantine", "[cpu]") {
  Fixture f;
  const AttachResult a = f.Attach("a");
  REQUIRE(f.manager.Allocate(a.session_token, "s", 5).ok());
  f.clock.Advance(absl::Seconds(11));
  f.manager.ExpireLeases();
  REQUIRE(f.manager.Stats().pools.size() == 1);
  f.manager.Shutdown();
  CHECK(f.manager.Stats().pools.empty());
  CHECK(f.manager.Stats().memory_used_bytes == 0);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("quarantine is at least the lease timeout", "[cpu]") {
  CacheManagerOptions o = Options();
  o.quarantine = absl::Seconds(1);
  Fixture f(o);
  CHECK(f.manager.quarantine() == absl::Seconds(10));
  o.quarantine = absl::ZeroDuration();
  Fixture g(o);
  CHECK(g.manager.quarantine() == absl::Seconds(10));
}

TEST_CASE("a call that arrived before the deadline renews the lease however late it runs",
          "[cpu]") {
  Fixture f;
  const AttachResult a = f.Attach("a");
  const absl::Time attached = f.clock.Now();
  Caller on_time(a.session_token);
  on_time.arrival = attached + absl::Seconds(9);
  f.clock.Advance(absl::Seconds(12));  // processed 2 s after the deadline
  auto left = f.manager.Heartbeat(on_time);
  REQUIRE(left.ok());
  CHECK(*left == absl::Seconds(7));  // renewed from its arrival
  CHECK(f.manager.ExpireLeases().empty());
  // An older call processed later never shortens the lease.
  Caller older(a.session_token);
  older.arrival = attached + absl::Seconds(1);
  REQUIRE(f.manager.Heartbeat(older).ok());
  CHECK(f.manager.Stats().clients[0].lease_remaining == absl::Seconds(7));
  // One that arrived after the deadline does not renew it.
  Caller late(a.session_token);
  late.arrival = attached + absl::Seconds(19);
  f.clock.Advance(absl::Seconds(8));
  CHECK(f.manager.Heartbeat(late).status().code() == absl::StatusCode::kNotFound);
}

// Waits up to `timeout` for `done`; true when it was set.
bool SetWithin(const std::atomic<bool>& done, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!done.load() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  return done.load();
}

TEST_CASE("a pool is built outside the lock: other clients go on meanwhile", "[cpu]") {
  BlockingBackend backend("big");
  FakeClock clock;
  CacheManager manager(Options(), &backend, &clock, nullptr);
  auto small = manager.Attach({"small-client", Model("small"), 8});
  REQUIRE(small.ok());
  REQUIRE(manager.Allocate(small->session_token, "s", 4).ok());
  const uint64_t used_before = manager.Stats().memory_used_bytes;

  absl::StatusOr<AttachResult> big1, big2;
  std::thread builder([&] { big1 = manager.Attach({"big-1", Model("big"), 64}); });
  backend.entered().WaitForNotification();
  // The second Attach of the model waits for the first build instead of building again.
  std::atomic<bool> second_done{false};
  std::thread waiter([&] {
    big2 = manager.Attach({"big-2", Model("big"), 64});
    second_done = true;
  });

  // While the build is blocked, another client's calls complete.
  std::atomic<bool> done{false};
  absl::Status heartbeat, allocate;
  StatsSnapshot during;
  std::thread other([&] {
    heartbeat = manager.Heartbeat(small->session_token).status();
    allocate = manager.Allocate(small->session_token, "s", 4).status();
    during = manager.Stats();
    done = true;
  });
  const bool not_locked_out = SetWithin(done, absl::Seconds(20));
  CHECK(not_locked_out);
  absl::SleepFor(absl::Milliseconds(50));
  CHECK_FALSE(second_done.load());
  // The books add up mid-build too: the pool and its first client's input buffer are charged
  // before the client exists (the soak's daemon once aborted on exactly this).
  const absl::Status books = manager.CheckInvariants();
  INFO(books.ToString());
  CHECK(books.ok());
  backend.Release();
  builder.join();
  waiter.join();
  other.join();
  CHECK(heartbeat.ok());
  CHECK(allocate.ok());
  // The pool being built is charged but not listed.
  CHECK(during.pools.size() == 1);
  CHECK(during.memory_used_bytes > used_before);

  REQUIRE(big1.ok());
  REQUIRE(big2.ok());
  CHECK(big1->pool.pool_id == big2->pool.pool_id);
  CHECK(backend.builds() == 1);
  REQUIRE(manager.CheckInvariants().ok());
}

TEST_CASE("a failed build gives its budget back", "[cpu]") {
  BlockingBackend backend("big");
  FakeClock clock;
  CacheManagerOptions o = Options();
  o.memory_budget_bytes = 1 << 20;
  o.default_pool_bytes = 1 << 20;
  CacheManager manager(o, &backend, &clock, nullptr);
  absl::StatusOr<AttachResult> big;
  std::thread builder([&] { big = manager.Attach({"big-1", Model("big"), 1024}); });
  backend.entered().WaitForNotification();
  // The reservation counts while the build runs: a pool that would overrun it is refused.
  const uint64_t reserved = manager.Stats().memory_used_bytes;
  CHECK(reserved > 0);
  auto squeezed = manager.Attach({"x", Model("other"), 2600});  // fits alone, not beside it
  CHECK(squeezed.status().code() == absl::StatusCode::kResourceExhausted);
  backend.Release(/*fail=*/true);
  builder.join();
  REQUIRE(big.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(manager.Stats().memory_used_bytes == 0);
  CHECK(manager.Stats().pools.empty());
  REQUIRE(manager.CheckInvariants().ok());
  // The name is free again.
  backend.set_fail(false);
  CHECK(manager.Attach({"x", Model("big"), 16}).ok());
}

}  // namespace
}  // namespace cachemgr
