#include "cachemgr/block_allocator.h"

#include <algorithm>
#include <cassert>

#include "absl/strings/str_cat.h"

namespace cachemgr {

BlockAllocator::BlockAllocator(uint32_t num_blocks) : refcounts_(num_blocks, 0) {
  free_list_.reserve(num_blocks);
  // Reverse order so a fresh pool hands out 0, 1, 2, ...: tables read naturally in logs.
  for (uint32_t b = num_blocks; b > 0; --b) free_list_.push_back(b - 1);
}

absl::StatusOr<std::vector<uint32_t>> BlockAllocator::Allocate(uint32_t count) {
  if (count > free_list_.size()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "asked for ", count, " blocks but ", free_list_.size(), " of ", capacity(), " are free"));
  }
  std::vector<uint32_t> blocks(free_list_.end() - count, free_list_.end());
  std::reverse(blocks.begin(), blocks.end());
  free_list_.resize(free_list_.size() - count);
  for (uint32_t b : blocks) refcounts_[b] = 1;
  return blocks;
}

void BlockAllocator::AddRef(uint32_t block) {
  assert(block < capacity() && refcounts_[block] > 0);
  if (++refcounts_[block] == 2) ++num_shared_;
}

bool BlockAllocator::Release(uint32_t block) {
  assert(block < capacity() && refcounts_[block] > 0);
  const uint32_t left = --refcounts_[block];
  if (left == 1) --num_shared_;
  if (left == 0) {
    free_list_.push_back(block);
    return true;
  }
  return false;
}

bool BlockAllocator::ReleaseToQuarantine(uint32_t block, absl::Time until) {
  assert(block < capacity() && refcounts_[block] > 0);
  const uint32_t left = --refcounts_[block];
  if (left == 1) --num_shared_;
  if (left != 0) return false;
  if (quarantine_.empty() || quarantine_.back().until != until) {
    quarantine_.push_back({until, {}});
  }
  quarantine_.back().blocks.push_back(block);
  ++num_quarantined_;
  return true;
}

uint32_t BlockAllocator::EndQuarantine(absl::Time now) {
  uint32_t freed = 0;
  while (!quarantine_.empty() && quarantine_.front().until <= now) {
    const std::vector<uint32_t>& blocks = quarantine_.front().blocks;
    free_list_.insert(free_list_.end(), blocks.begin(), blocks.end());
    freed += static_cast<uint32_t>(blocks.size());
    quarantine_.pop_front();
  }
  num_quarantined_ -= freed;
  return freed;
}

absl::Status BlockAllocator::CheckInvariants() const {
  // Per block: on the free list or in the quarantine (at most one of them, once).
  std::vector<bool> unreferenced(capacity(), false);
  auto mark = [&](uint32_t b, const char* where) -> absl::Status {
    if (b >= capacity()) return absl::InternalError(absl::StrCat(where, " holds bad id ", b));
    if (unreferenced[b]) {
      return absl::InternalError(absl::StrCat("block ", b, " released twice (", where, ")"));
    }
    unreferenced[b] = true;
    return absl::OkStatus();
  };
  for (uint32_t b : free_list_) {
    if (absl::Status s = mark(b, "free list"); !s.ok()) return s;
  }
  uint32_t quarantined = 0;
  for (const QuarantineBatch& batch : quarantine_) {
    for (uint32_t b : batch.blocks) {
      if (absl::Status s = mark(b, "quarantine"); !s.ok()) return s;
    }
    quarantined += static_cast<uint32_t>(batch.blocks.size());
  }
  if (quarantined != num_quarantined_) {
    return absl::InternalError(
        absl::StrCat("quarantine holds ", quarantined, " blocks but counts ", num_quarantined_));
  }
  uint32_t used = 0, shared = 0;
  for (uint32_t b = 0; b < capacity(); ++b) {
    if (unreferenced[b] != (refcounts_[b] == 0)) {
      return absl::InternalError(absl::StrCat("block ", b, " has refcount ", refcounts_[b],
                                              " but free-or-quarantined=", unreferenced[b]));
    }
    if (refcounts_[b] > 0) ++used;
    if (refcounts_[b] > 1) ++shared;
  }
  if (used + num_free() + num_quarantined_ != capacity()) {
    return absl::InternalError(absl::StrCat("free ", num_free(), " + used ", used,
                                            " + quarantined ", num_quarantined_, " != capacity ",
                                            capacity()));
  }
  if (shared != num_shared_) {
    return absl::InternalError(
        absl::StrCat("shared count ", num_shared_, " but ", shared, " blocks are shared"));
  }
  return absl::OkStatus();
}

}  // namespace cachemgr
