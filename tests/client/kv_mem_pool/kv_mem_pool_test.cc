// The KV mem-pool allocator on a fake region: the address range of a host buffer, which the
// allocator never touches (it only computes addresses), standing in for the device memory of a
// CUDA pool. RegionAllocator directly, then the C API of the shared library PyTorch loads.
#include "client/kv_mem_pool/kv_mem_pool.h"

#include <catch2/catch.hpp>
#include <cerrno>
#include <cstdint>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "client/kv_mem_pool/region_allocator.h"

namespace cachemgr::kv_mem_pool {
namespace {

constexpr uint64_t kRegionBytes = 1 << 20;

// A kAlignment-aligned fake region of `bytes` (kRegionBytes by default).
struct FakeRegion {
  explicit FakeRegion(uint64_t bytes = kRegionBytes) : storage(bytes + kAlignment) {}
  std::vector<std::byte> storage;
  uint64_t base =
      (reinterpret_cast<uint64_t>(storage.data()) + kAlignment - 1) / kAlignment * kAlignment;
};

uint64_t Address(void* p) { return reinterpret_cast<uint64_t>(p); }

TEST_CASE("every allocation is aligned, inside the region and disjoint", "[cpu]") {
  FakeRegion region;
  RegionAllocator allocator;
  REQUIRE(allocator.Configure(2, region.base, kRegionBytes) == 0);
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (int64_t size : {1, 255, 256, 257, 1000, 4096, 12345}) {
    void* p = allocator.Allocate(size, 2);
    REQUIRE(p != nullptr);
    CHECK(Address(p) % kAlignment == 0);
    CHECK(Address(p) >= region.base);
    CHECK(Address(p) + size <= region.base + kRegionBytes);
    for (const auto& [start, end] : ranges) {
      CHECK((Address(p) + size <= start || Address(p) >= end));
    }
    ranges.emplace_back(Address(p), Address(p) + size);
  }
  const RegionStats stats = allocator.stats();
  CHECK(stats.device == 2);
  CHECK(stats.live_allocations == 7);
  CHECK(stats.total_allocations == 7);
  // Each rounded up to 256: 256 + 256 + 256 + 512 + 1024 + 4096 + 12544.
  CHECK(stats.bytes_in_use == 18944);
  CHECK(stats.peak_bytes_in_use == 18944);
  CHECK(stats.failed_allocations == 0);
}

TEST_CASE("an exhausted region answers nullptr and never anything else", "[cpu]") {
  FakeRegion region;
  RegionAllocator allocator;
  REQUIRE(allocator.Configure(0, region.base, kRegionBytes) == 0);
  void* all = allocator.Allocate(kRegionBytes, 0);
  REQUIRE(Address(all) == region.base);
  CHECK(allocator.Allocate(1, 0) == nullptr);
  CHECK(allocator.Allocate(kRegionBytes + 1, 0) == nullptr);
  CHECK(allocator.Allocate(INT64_MAX, 0) == nullptr);  // no overflow in the rounding
  CHECK(allocator.Allocate(-5, 0) == nullptr);
  CHECK(allocator.stats().failed_allocations == 4);
  CHECK(allocator.Allocate(0, 0) == nullptr);  // size 0: nothing to hand out, not a failure
  CHECK(allocator.stats().failed_allocations == 4);
  REQUIRE(allocator.Free(all));
  CHECK(allocator.Allocate(1, 0) != nullptr);
}

TEST_CASE("another device, or no region, gets nullptr", "[cpu]") {
  FakeRegion region;
  RegionAllocator allocator;
  CHECK(allocator.Allocate(256, 0) == nullptr);  // before Configure
  REQUIRE(allocator.Configure(1, region.base, kRegionBytes) == 0);
  CHECK(allocator.Allocate(256, 0) == nullptr);
  CHECK(allocator.Allocate(256, 1) != nullptr);
  CHECK(allocator.stats().failed_allocations == 1);  // Configure zeroed the counters
}

TEST_CASE("frees coalesce so that a large allocation fits again", "[cpu]") {
  FakeRegion region;
  RegionAllocator allocator;
  REQUIRE(allocator.Configure(0, region.base, kRegionBytes) == 0);
  constexpr uint64_t kQuarter = kRegionBytes / 4;
  std::vector<void*> quarters;
  for (int i = 0; i < 4; ++i) quarters.push_back(allocator.Allocate(kQuarter, 0));
  for (void* q : quarters) REQUIRE(q != nullptr);
  CHECK(allocator.Allocate(1, 0) == nullptr);
  // Free the second and fourth: half the region is free, but no range of half.
  REQUIRE(allocator.Free(quarters[1]));
  REQUIRE(allocator.Free(quarters[3]));
  CHECK(allocator.stats().largest_free_bytes == kQuarter);
  CHECK(allocator.Allocate(kRegionBytes / 2, 0) == nullptr);
  // The third joins both neighbours: three quarters in one range.
  REQUIRE(allocator.Free(quarters[2]));
  CHECK(allocator.stats().largest_free_bytes == 3 * kQuarter);
  void* three = allocator.Allocate(3 * kQuarter, 0);
  CHECK(Address(three) == region.base + kQuarter);
  REQUIRE(allocator.Free(three));
  REQUIRE(allocator.Free(quarters[0]));
  const RegionStats stats = allocator.stats();
  CHECK(stats.bytes_in_use == 0);
  CHECK(stats.live_allocations == 0);
  CHECK(stats.largest_free_bytes == kRegionBytes);
  CHECK(stats.peak_bytes_in_use == kRegionBytes);
  CHECK(Address(allocator.Allocate(kRegionBytes, 0)) == region.base);
}

TEST_CASE("foreign and double frees are counted and change nothing", "[cpu]") {
  FakeRegion region;
  RegionAllocator allocator;
  REQUIRE(allocator.Configure(0, region.base, kRegionBytes) == 0);
  void* a = allocator.Allocate(1000, 0);
  void* b = allocator.Allocate(1000, 0);
  REQUIRE((a != nullptr && b != nullptr));
  int outside = 0;
  CHECK_FALSE(allocator.Free(&outside));                                 // another allocator's
  CHECK_FALSE(allocator.Free(static_cast<std::byte*>(a) + kAlignment));  // inside, not a start
  CHECK_FALSE(allocator.Free(reinterpret_cast<void*>(region.base + kRegionBytes - kAlignment)));
  CHECK_FALSE(allocator.Free(nullptr));  // ignored, not counted
  REQUIRE(allocator.Free(a));
  CHECK_FALSE(allocator.Free(a));  // twice
  RegionStats stats = allocator.stats();
  CHECK(stats.rejected_frees == 4);
  CHECK(stats.live_allocations == 1);
  CHECK(stats.bytes_in_use == 1024);
  // b is still b's: the region's books did not move.
  REQUIRE(allocator.Free(b));
  CHECK(allocator.stats().largest_free_bytes == kRegionBytes);
}

TEST_CASE("Configure validates the region and refuses while allocations are live", "[cpu]") {
  FakeRegion region;
  RegionAllocator allocator;
  CHECK(allocator.Configure(-1, region.base, kRegionBytes) == -EINVAL);
  CHECK(allocator.Configure(0, 0, kRegionBytes) == -EINVAL);
  CHECK(allocator.Configure(0, region.base + 8, kRegionBytes) == -EINVAL);  // misaligned
  CHECK(allocator.Configure(0, region.base, kAlignment - 1) == -EINVAL);
  CHECK(allocator.Configure(0, UINT64_MAX - kAlignment + 1, 2 * kAlignment) == -EINVAL);
  // A size that is not a multiple of the alignment is rounded down.
  REQUIRE(allocator.Configure(0, region.base, kRegionBytes + 100) == 0);
  CHECK(allocator.stats().region_bytes == kRegionBytes);
  void* p = allocator.Allocate(10, 0);
  CHECK(allocator.Configure(0, region.base, kRegionBytes) == -EBUSY);
  CHECK(allocator.Reset() == -EBUSY);
  CHECK(allocator.stats().live_allocations == 1);
  REQUIRE(allocator.Free(p));
  CHECK(allocator.Reset() == 0);
  CHECK(allocator.stats().region_bytes == 0);
  CHECK(allocator.Allocate(10, 0) == nullptr);
}

TEST_CASE("threads allocating and freeing at once keep the books", "[cpu]") {
  // At most 8 x 8 live allocations of up to 8 KiB (512 KiB) at once; 4 MiB is more than first
  // fit's worst-case fragmentation for sizes from 256 B to 8 KiB (Robson's bound: 512 KiB x
  // log2(32)), so every request must fit whatever the interleaving.
  constexpr uint64_t kBytes = 4 << 20;
  FakeRegion region(kBytes);
  RegionAllocator allocator;
  REQUIRE(allocator.Configure(0, region.base, kBytes) == 0);
  constexpr int kThreads = 8;
  constexpr int kRounds = 2000;
  std::vector<std::thread> threads;
  std::vector<int> bad(kThreads, 0);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::vector<std::pair<std::byte*, int64_t>> mine;
      for (int i = 0; i < kRounds; ++i) {
        if (mine.size() < 8 && rng() % 3 != 0) {
          const int64_t size = 1 + rng() % 8192;
          auto* p = static_cast<std::byte*>(allocator.Allocate(size, 0));
          if (p == nullptr || Address(p) % kAlignment != 0) ++bad[t];
          if (p != nullptr) mine.emplace_back(p, size);
        } else if (!mine.empty()) {
          const size_t k = rng() % mine.size();
          if (!allocator.Free(mine[k].first)) ++bad[t];
          mine.erase(mine.begin() + static_cast<std::ptrdiff_t>(k));
        }
      }
      for (const auto& [p, size] : mine) {
        if (!allocator.Free(p)) ++bad[t];
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int t = 0; t < kThreads; ++t) CHECK(bad[t] == 0);
  const RegionStats stats = allocator.stats();
  CHECK(stats.live_allocations == 0);
  CHECK(stats.bytes_in_use == 0);
  CHECK(stats.failed_allocations == 0);
  CHECK(stats.rejected_frees == 0);
  CHECK(stats.largest_free_bytes == kBytes);
  CHECK(stats.total_allocations > kThreads * kRounds / 3);
}

TEST_CASE("the C API PyTorch calls works on one process-wide region", "[cpu]") {
  FakeRegion region;
  CHECK(cachemgr_kv_pool_stats_size() == sizeof(CachemgrKvPoolStats));
  CHECK(cachemgr_kv_pool_configure(0, region.base + 1, kRegionBytes) == -EINVAL);
  REQUIRE(cachemgr_kv_pool_configure(3, region.base, kRegionBytes) == 0);
  void* stream = reinterpret_cast<void*>(0x1234);  // ignored
  void* a = cachemgr_kv_malloc(2 << 10, 3, stream);
  void* b = cachemgr_kv_malloc(kRegionBytes, 3, stream);  // does not fit beside a
  void* c = cachemgr_kv_malloc(100, 0, stream);           // another device
  CHECK(Address(a) == region.base);
  CHECK(b == nullptr);
  CHECK(c == nullptr);
  CachemgrKvPoolStats stats{};
  cachemgr_kv_pool_get_stats(&stats);
  CHECK(stats.device == 3);
  CHECK(stats.base == region.base);
  CHECK(stats.region_bytes == kRegionBytes);
  CHECK(stats.bytes_in_use == 2048);
  CHECK(stats.failed_allocations == 2);
  CHECK(cachemgr_kv_pool_reset() == -EBUSY);
  cachemgr_kv_free(a, 2 << 10, 3, stream);
  cachemgr_kv_free(a, 2 << 10, 3, stream);  // twice: counted, ignored
  cachemgr_kv_pool_get_stats(&stats);
  CHECK(stats.bytes_in_use == 0);
  CHECK(stats.rejected_frees == 1);
  cachemgr_kv_pool_get_stats(nullptr);
  CHECK(cachemgr_kv_pool_reset() == 0);
  CHECK(cachemgr_kv_malloc(256, 3, stream) == nullptr);
}

}  // namespace
}  // namespace cachemgr::kv_mem_pool
