// GetSequence's KV digests read every row of a sequence (gigabytes for a long one), so they run
// outside the manager's lock: another client's calls go on meanwhile, and a digest whose sequence
// changed while it was read is refused (ABORTED) rather than answered from stale tables.
#include <atomic>
#include <catch2/catch.hpp>
#include <thread>

#include "absl/synchronization/notification.h"
#include "cachemgr/backend/host_backend.h"
#include "cachemgr/cache_manager.h"

namespace cachemgr {
namespace {

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

// Host pool memory whose DigestLayer blocks (once armed) until released.
class GatedMemory final : public PoolMemory {
 public:
  GatedMemory(std::unique_ptr<PoolMemory> inner, absl::Notification* entered,
              absl::Notification* release, std::atomic<bool>* armed)
      : inner_(std::move(inner)), entered_(entered), release_(release), armed_(armed) {}

  const kernels::KvLayerLayout& layout() const override { return inner_->layout(); }
  const std::vector<RegionInfo>& regions() const override { return inner_->regions(); }
  const std::vector<LayerPlacement>& layers() const override { return inner_->layers(); }
  std::vector<int> ShareFds() const override { return inner_->ShareFds(); }
  absl::Status CopyBlocks(uint32_t layer, absl::Span<const kernels::BlockCopyPair> p) override {
    return inner_->CopyBlocks(layer, p);
  }
  absl::Status GatherTokens(uint32_t layer, absl::Span<const int64_t> slots, float* k,
                            float* v) const override {
    return inner_->GatherTokens(layer, slots, k, v);
  }
  absl::Status ScatterTokens(uint32_t layer, absl::Span<const int64_t> slots, const float* k,
                             const float* v) override {
    return inner_->ScatterTokens(layer, slots, k, v);
  }
  absl::Status CompactHeads(uint32_t layer, absl::Span<const uint32_t> table, uint32_t n,
                            absl::Span<const uint32_t> kept, uint32_t rows) override {
    return inner_->CompactHeads(layer, table, n, kept, rows);
  }
  absl::Status AttentionColumnSums(uint32_t layer, absl::Span<const int64_t> slots, uint32_t hq,
                                   const float* q, uint32_t nq, float* sums) const override {
    return inner_->AttentionColumnSums(layer, slots, hq, q, nq, sums);
  }
  absl::Status ScatterCodedRows(uint32_t layer, absl::Span<const int64_t> slots,
                                const compress::CodedRows& coded) override {
    return inner_->ScatterCodedRows(layer, slots, coded);
  }
  absl::StatusOr<uint64_t> DigestLayer(uint32_t layer, absl::Span<const uint32_t> table,
                                       uint32_t n) const override {
    if (armed_->exchange(false)) {
      entered_->Notify();
      release_->WaitForNotification();
    }
    return inner_->DigestLayer(layer, table, n);
  }

 private:
  std::unique_ptr<PoolMemory> inner_;
  absl::Notification* entered_;
  absl::Notification* release_;
  std::atomic<bool>* armed_;
};

class GatedBackend final : public DeviceBackend {
 public:
  BackendKind kind() const override { return host_.kind(); }
  ShareMethod share_method() const override { return host_.share_method(); }
  std::string device_name() const override { return host_.device_name(); }
  absl::StatusOr<uint64_t> PoolBytes(const kernels::KvLayerLayout& layout,
                                     uint32_t num_layers) const override {
    return host_.PoolBytes(layout, num_layers);
  }
  absl::StatusOr<std::unique_ptr<PoolMemory>> CreatePool(const std::string& pool_id,
                                                         const kernels::KvLayerLayout& layout,
                                                         kernels::KvElemType type,
                                                         uint32_t num_layers) override {
    auto inner = host_.CreatePool(pool_id, layout, type, num_layers);
    if (!inner.ok()) return inner.status();
    return std::unique_ptr<PoolMemory>(
        new GatedMemory(*std::move(inner), &entered, &release, &armed));
  }

  absl::Notification entered, release;
  std::atomic<bool> armed{false};

 private:
  HostBackend host_;
};

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
