// BlockAllocator: the free list and reference counts of one layer's pool.
//
// A block is free (refcount 0, on the free list) or used (refcount >= 1, referenced by that
// many sequences; > 1 only through Fork). Invariant: free + used == capacity.
// Not thread-safe: the CacheManager's mutex guards every allocator.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace cachemgr {

class BlockAllocator {
 public:
  explicit BlockAllocator(uint32_t num_blocks);

  uint32_t capacity() const { return static_cast<uint32_t>(refcounts_.size()); }
  uint32_t num_free() const { return static_cast<uint32_t>(free_list_.size()); }
  uint32_t num_used() const { return capacity() - num_free(); }
  // Used blocks with more than one reference.
  uint32_t num_shared() const { return num_shared_; }

  // Takes `count` blocks (refcount 1 each), lowest ids first on a fresh pool. All or nothing:
  // RESOURCE_EXHAUSTED naming `count` and the free blocks when fewer are free.
  absl::StatusOr<std::vector<uint32_t>> Allocate(uint32_t count);

  // Adds a reference to a used block. REQUIRES: block < capacity() and refcount(block) > 0.
  void AddRef(uint32_t block);

  // Drops a reference; returns true when it was the last one and the block is free again.
  // REQUIRES: block < capacity() and refcount(block) > 0.
  bool Release(uint32_t block);

  uint32_t refcount(uint32_t block) const { return refcounts_[block]; }

  // Full consistency check (O(capacity)): free list holds distinct free blocks, refcount 0
  // exactly for them, the shared count matches. For tests and debug builds.
  absl::Status CheckInvariants() const;

 private:
  std::vector<uint32_t> free_list_;  // stack: back() is handed out next
  std::vector<uint32_t> refcounts_;
  uint32_t num_shared_ = 0;
};

}  // namespace cachemgr
