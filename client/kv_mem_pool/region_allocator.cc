#include "client/kv_mem_pool/region_allocator.h"

#include <cerrno>
#include <iterator>

namespace cachemgr::kv_mem_pool {

int RegionAllocator::Configure(int device, uint64_t base, uint64_t bytes) {
  const uint64_t usable = bytes - bytes % kAlignment;
  if (device < 0 || base == 0 || base % kAlignment != 0 || usable == 0 || base + usable < base) {
    return -EINVAL;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!live_.empty()) return -EBUSY;
  stats_ = RegionStats{};
  stats_.device = device;
  stats_.base = base;
  stats_.region_bytes = usable;
  free_.clear();
  free_.emplace(0, usable);
  return 0;
}

int RegionAllocator::Reset() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!live_.empty()) return -EBUSY;
  stats_ = RegionStats{};
  free_.clear();
  return 0;
}

void* RegionAllocator::Allocate(int64_t size, int device) {
  std::lock_guard<std::mutex> lock(mu_);
  if (size == 0) return nullptr;  // like cudaMalloc(0): nothing to hand out, not a failure
  // Sizes beyond the region cannot fit; checking first also keeps the rounding from overflowing.
  if (size < 0 || stats_.region_bytes == 0 || device != stats_.device ||
      static_cast<uint64_t>(size) > stats_.region_bytes) {
    ++stats_.failed_allocations;
    return nullptr;
  }
  const uint64_t want = (static_cast<uint64_t>(size) + kAlignment - 1) / kAlignment * kAlignment;
  auto it = free_.begin();
  while (it != free_.end() && it->second < want) ++it;
  if (it == free_.end()) {
    ++stats_.failed_allocations;
    return nullptr;
  }
  const uint64_t offset = it->first;
  const uint64_t left = it->second - want;
  free_.erase(it);
  if (left > 0) free_.emplace(offset + want, left);
  live_.emplace(offset, want);
  stats_.bytes_in_use += want;
  if (stats_.bytes_in_use > stats_.peak_bytes_in_use) {
    stats_.peak_bytes_in_use = stats_.bytes_in_use;
  }
  ++stats_.live_allocations;
  ++stats_.total_allocations;
  return reinterpret_cast<void*>(stats_.base + offset);
}

bool RegionAllocator::Free(void* ptr) {
  if (ptr == nullptr) return false;
  const uint64_t address = reinterpret_cast<uint64_t>(ptr);
  std::lock_guard<std::mutex> lock(mu_);
  auto live = address >= stats_.base ? live_.find(address - stats_.base) : live_.end();
  if (stats_.region_bytes == 0 || live == live_.end()) {
    ++stats_.rejected_frees;
    return false;
  }
  uint64_t offset = live->first;
  uint64_t bytes = live->second;
  live_.erase(live);
  stats_.bytes_in_use -= bytes;
  --stats_.live_allocations;
  // Merge with the free neighbours so that a later large allocation finds one range.
  auto next = free_.lower_bound(offset);
  if (next != free_.end() && offset + bytes == next->first) {
    bytes += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      offset = prev->first;
      bytes += prev->second;
      free_.erase(prev);
    }
  }
  free_.emplace(offset, bytes);
  return true;
}

RegionStats RegionAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  RegionStats out = stats_;
  out.largest_free_bytes = LargestFreeLocked();
  return out;
}

uint64_t RegionAllocator::LargestFreeLocked() const {
  uint64_t largest = 0;
  for (const auto& [offset, bytes] : free_) {
    if (bytes > largest) largest = bytes;
  }
  return largest;
}

}  // namespace cachemgr::kv_mem_pool
