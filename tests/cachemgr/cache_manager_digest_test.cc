// GetSequence's KV digests read every row of a sequence (gigabytes for a long one), so they run
// outside the manager's lock: another client's calls go on meanwhile, and a digest whose sequence
// changed while it was read is refused (ABORTED) rather than answered from stale tables.
#include <atomic>
#include <catch2/catch.hpp>
#include <thread>

#include "absl/synchronization/notification.h"
#include "cachemgr/cache_manager.h"
#include "tests/cachemgr/gated_backend.h"

namespace cachemgr {
namespace {

using testing::GatedBackend;

ModelSpec Model(const std::string& name) {
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

struct Fixture {
  Fixture() : manager(CacheManagerOptions(), &backend, &clock, nullptr) {}
  GatedBackend backend;
  FakeClock clock;
  CacheManager manager;
};

TEST_CASE("a digest in progress does not hold other clients up", "[cpu]") {
  Fixture f;
  auto a = f.manager.Attach({"a", Model("m"), 16});
  auto b = f.manager.Attach({"b", Model("m"), 16});
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(f.manager.Allocate(a->session_token, "sa", 9).ok());

  f.backend.armed = true;
  absl::StatusOr<SequenceSnapshot> digested;
  std::thread reader([&] {
    digested = f.manager.GetSequence(a->session_token, "sa", /*include_kv_digest=*/true);
  });
  f.backend.entered.WaitForNotification();
  // The digest is parked inside the pool read: every other call still completes (with the lock
  // held across the read they would wait for the release, which comes only after the timeout).
  absl::Notification others_done;
  bool others_ok = false;
  std::thread other([&] {
    others_ok = f.manager.Allocate(b->session_token, "sb", 5).ok() &&
                f.manager.Heartbeat(b->session_token).ok() && f.manager.Stats().num_sequences == 2;
    others_done.Notify();
  });
  const bool went_on = others_done.WaitForNotificationWithTimeout(absl::Seconds(30));
  f.backend.release.Notify();
  other.join();
  reader.join();
  CHECK(went_on);
  CHECK(others_ok);
  REQUIRE(digested.ok());
  CHECK(digested->layers[0].kv_digest.has_value());
  CHECK(digested->layers[1].kv_digest.has_value());
  // The same digests as an undisturbed read.
  auto again = f.manager.GetSequence(a->session_token, "sa", true);
  REQUIRE(again.ok());
  CHECK(again->layers[0].kv_digest == digested->layers[0].kv_digest);
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("a sequence that changes while its digest is read gets ABORTED", "[cpu]") {
  Fixture f;
  auto a = f.manager.Attach({"a", Model("m"), 16});
  REQUIRE(a.ok());
  REQUIRE(f.manager.Allocate(a->session_token, "sa", 9).ok());

  SECTION("appended to") {
    f.backend.armed = true;
    absl::StatusOr<SequenceSnapshot> digested;
    std::thread reader([&] { digested = f.manager.GetSequence(a->session_token, "sa", true); });
    f.backend.entered.WaitForNotification();
    REQUIRE(f.manager.Allocate(a->session_token, "sa", 4).ok());  // a new block in each layer
    f.backend.release.Notify();
    reader.join();
    CHECK(digested.status().code() == absl::StatusCode::kAborted);
    CHECK_THAT(std::string(digested.status().message()), Catch::Contains("retry"));
  }
  SECTION("freed and its id reused") {
    f.backend.armed = true;
    absl::StatusOr<SequenceSnapshot> digested;
    std::thread reader([&] { digested = f.manager.GetSequence(a->session_token, "sa", true); });
    f.backend.entered.WaitForNotification();
    REQUIRE(f.manager.Free(a->session_token, "sa").ok());
    REQUIRE(f.manager.Allocate(a->session_token, "sa", 9).ok());
    f.backend.release.Notify();
    reader.join();
    CHECK(digested.status().code() == absl::StatusCode::kAborted);
  }
  REQUIRE(f.manager.CheckInvariants().ok());
}

}  // namespace
}  // namespace cachemgr
