// BlockAllocator: the free list, reference counts and quarantine of one layer's pool.
//
// A block is free (refcount 0, on the free list), used (refcount >= 1, referenced by that many
// sequences; > 1 only through Fork) or quarantined (refcount 0, waiting until a time before it
// goes back to the free list: the blocks of a client whose lease expired, which may still write
// to them through its mapping). Invariant: free + used + quarantined == capacity.
// Not thread-safe: the CacheManager's mutex guards every allocator.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace cachemgr {

class BlockAllocator {
 public:
  // Host memory the allocator keeps per block of capacity, at most: its refcount, its free-list
  // entry (reserved up front) and its quarantine entry. The memory budget counts it.
  static constexpr uint64_t kBookkeepingBytesPerBlock = 3 * sizeof(uint32_t);

  explicit BlockAllocator(uint32_t num_blocks);

  uint32_t capacity() const { return static_cast<uint32_t>(refcounts_.size()); }
  uint32_t num_free() const { return static_cast<uint32_t>(free_list_.size()); }
  uint32_t num_quarantined() const { return num_quarantined_; }
  uint32_t num_used() const { return capacity() - num_free() - num_quarantined(); }
  // Used blocks with more than one reference.
  uint32_t num_shared() const { return num_shared_; }

  // Takes `count` blocks (refcount 1 each), lowest ids first on a fresh pool. All or nothing:
  // RESOURCE_EXHAUSTED naming `count` and the free blocks when fewer are free. Quarantined
  // blocks are never handed out.
  absl::StatusOr<std::vector<uint32_t>> Allocate(uint32_t count);

  // Adds a reference to a used block. REQUIRES: block < capacity() and refcount(block) > 0.
  void AddRef(uint32_t block);

  // Drops a reference; returns true when it was the last one and the block is free again.
  // REQUIRES: block < capacity() and refcount(block) > 0.
  bool Release(uint32_t block);

  // As Release, but a block whose last reference goes away is quarantined until `until`
  // instead of becoming free; returns true then. Quarantined blocks leave in the order they came
  // (so one with a later `until` can hold back ones behind it, never the reverse).
  bool ReleaseToQuarantine(uint32_t block, absl::Time until);

  // Frees every quarantined block whose time is <= `now`; returns how many.
  uint32_t EndQuarantine(absl::Time now);

  uint32_t refcount(uint32_t block) const { return refcounts_[block]; }

  // Full consistency check (O(capacity)): the free list and the quarantine hold distinct blocks
  // of refcount 0, every refcount-0 block is in exactly one of them, the counts and the shared
  // count match. For tests and debug builds.
  absl::Status CheckInvariants() const;

 private:
  // Blocks released together (one expired client's, in one layer) and when they may go free.
  struct QuarantineBatch {
    absl::Time until;
    std::vector<uint32_t> blocks;
  };

  std::vector<uint32_t> free_list_;  // stack: back() is handed out next
  std::vector<uint32_t> refcounts_;
  std::deque<QuarantineBatch> quarantine_;  // oldest first
  uint32_t num_quarantined_ = 0;
  uint32_t num_shared_ = 0;
};

}  // namespace cachemgr
