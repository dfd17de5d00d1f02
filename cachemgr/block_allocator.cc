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

absl::Status BlockAllocator::CheckInvariants() const {
  std::vector<bool> on_free_list(capacity(), false);
  for (uint32_t b : free_list_) {
    if (b >= capacity()) return absl::InternalError(absl::StrCat("free list holds bad id ", b));
    if (on_free_list[b]) return absl::InternalError(absl::StrCat("block ", b, " freed twice"));
    on_free_list[b] = true;
  }
  uint32_t used = 0, shared = 0;
  for (uint32_t b = 0; b < capacity(); ++b) {
    if (on_free_list[b] != (refcounts_[b] == 0)) {
      return absl::InternalError(absl::StrCat("block ", b, " has refcount ", refcounts_[b],
                                              " but on_free_list=", on_free_list[b]));
    }
    if (refcounts_[b] > 0) ++used;
    if (refcounts_[b] > 1) ++shared;
  }
  if (used + num_free() != capacity()) {
    return absl::InternalError(
        absl::StrCat("free ", num_free(), " + used ", used, " != capacity ", capacity()));
  }
  if (shared != num_shared_) {
    return absl::InternalError(
        absl::StrCat("shared count ", num_shared_, " but ", shared, " blocks are shared"));
  }
  return absl::OkStatus();
}

}  // namespace cachemgr
