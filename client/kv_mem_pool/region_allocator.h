// RegionAllocator: hands out aligned byte ranges of one address range it is given (a "region"),
// and takes them back. It only does the bookkeeping: it never reads or writes the region, so the
// region may be device memory (the CUDA pool cachemgrd lends, see kv_mem_pool.h) or, in tests,
// any range of addresses.
//
// Policy: first fit by address over a free list kept sorted by address; a free merges the range
// with its free neighbours (coalescing), so freeing everything leaves one free range, the whole
// region. Every allocation is rounded up to kAlignment bytes and starts at a multiple of
// kAlignment from the region's base (which must itself be kAlignment-aligned), so every pointer
// handed out is kAlignment-aligned.
//
// Errors are int codes (0, -EINVAL, -EBUSY) rather than absl::Status: this code is compiled
// into a dependency-free shared library with a C ABI (kv_mem_pool.h), loaded into Python
// processes by PyTorch.
//
// Thread-safe: every member function takes the allocator's mutex (microseconds at most: the
// free list holds a handful of ranges in the KV cache's use).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>

namespace cachemgr::kv_mem_pool {

// Alignment of every allocation (what cudaMalloc guarantees; PyTorch's caching allocator asks
// for whole segments of 2 MiB multiples and splits them itself at 512-byte granularity).
inline constexpr uint64_t kAlignment = 256;

struct RegionStats {
  int64_t device = -1;              // the configured device; -1 before Configure
  uint64_t base = 0;                // the region's first address; 0 before Configure
  uint64_t region_bytes = 0;        // usable bytes (the given size rounded down to kAlignment)
  uint64_t bytes_in_use = 0;        // bytes of live allocations, each rounded up to kAlignment
  uint64_t peak_bytes_in_use = 0;   // highest bytes_in_use since Configure
  uint64_t live_allocations = 0;    // allocations not freed yet
  uint64_t total_allocations = 0;   // successful allocations since Configure
  uint64_t failed_allocations = 0;  // requests answered with nullptr since Configure
  uint64_t rejected_frees = 0;      // frees of pointers not live here (foreign, double), ignored
  uint64_t largest_free_bytes = 0;  // the largest free range: the largest allocation that fits
};

class RegionAllocator {
 public:
  RegionAllocator() = default;
  RegionAllocator(const RegionAllocator&) = delete;
  RegionAllocator& operator=(const RegionAllocator&) = delete;

  // Makes [base, base + bytes) on `device` the region, all of it free, and zeroes the counters.
  // -EINVAL: device < 0, base 0 or not kAlignment-aligned, fewer than kAlignment bytes, or
  // base + bytes overflows. -EBUSY: allocations of the previous region are still live (the
  // region stays as it was).
  int Configure(int device, uint64_t base, uint64_t bytes);

  // Forgets the region (Allocate then fails until the next Configure). -EBUSY while
  // allocations are live.
  int Reset();

  // A kAlignment-aligned range of at least `size` bytes on `device`, or nullptr when there is
  // no region, `device` is not the region's, `size` <= 0, or no free range is large enough.
  // Never allocates memory any other way. nullptr answers are counted (failed_allocations),
  // except for size 0.
  void* Allocate(int64_t size, int device);

  // Returns the allocation that starts at `ptr` to the free list (its size is the one recorded
  // at Allocate; the caller's size is not needed). A pointer that is not a live allocation of
  // this region (never handed out, freed already, from another allocator) is ignored and
  // counted in rejected_frees; nullptr is ignored and not counted. Returns whether `ptr` was
  // freed.
  bool Free(void* ptr);

  RegionStats stats() const;

 private:
  uint64_t LargestFreeLocked() const;

  mutable std::mutex mu_;
  // Guarded by mu_.
  RegionStats stats_;
  std::map<uint64_t, uint64_t> free_;            // offset -> bytes; disjoint, never adjacent
  std::unordered_map<uint64_t, uint64_t> live_;  // offset -> bytes of live allocations
};

}  // namespace cachemgr::kv_mem_pool
