#include "cachemgr/block_allocator.h"

#include <catch2/catch.hpp>
#include <random>
#include <set>

namespace cachemgr {
namespace {

TEST_CASE("fresh allocator hands out lowest ids first", "[cpu]") {
  BlockAllocator a(8);
  REQUIRE(a.capacity() == 8);
  REQUIRE(a.num_free() == 8);
  auto blocks = a.Allocate(3);
  REQUIRE(blocks.ok());
  CHECK(*blocks == std::vector<uint32_t>{0, 1, 2});
  CHECK(a.num_used() == 3);
  CHECK(a.num_free() == 5);
  for (uint32_t b : *blocks) CHECK(a.refcount(b) == 1);
  REQUIRE(a.CheckInvariants().ok());
}

TEST_CASE("allocation is all or nothing and names the counts", "[cpu]") {
  BlockAllocator a(4);
  REQUIRE(a.Allocate(3).ok());
  auto too_many = a.Allocate(2);
  REQUIRE(too_many.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(too_many.status().message() == "asked for 2 blocks but 1 of 4 are free");
  CHECK(a.num_free() == 1);
  REQUIRE(a.CheckInvariants().ok());
}

TEST_CASE("refcounts: shared blocks are freed by their last reference", "[cpu]") {
  BlockAllocator a(4);
  auto blocks = *a.Allocate(2);
  a.AddRef(blocks[0]);
  CHECK(a.num_shared() == 1);
  CHECK(a.refcount(blocks[0]) == 2);
  CHECK_FALSE(a.Release(blocks[0]));
  CHECK(a.num_shared() == 0);
  CHECK(a.num_used() == 2);
  CHECK(a.Release(blocks[0]));
  CHECK(a.Release(blocks[1]));
  CHECK(a.num_free() == 4);
  REQUIRE(a.CheckInvariants().ok());
}

TEST_CASE("freed blocks are reused most recent first", "[cpu]") {
  BlockAllocator a(4);
  auto blocks = *a.Allocate(4);
  a.Release(blocks[2]);
  auto again = *a.Allocate(1);
  CHECK(again[0] == blocks[2]);
}

TEST_CASE("random alloc/addref/release keeps free + used == capacity", "[cpu]") {
  std::mt19937 rng(7);
  BlockAllocator a(64);
  std::multiset<uint32_t> refs;  // one entry per reference we hold
  for (int step = 0; step < 5000; ++step) {
    const int op = rng() % 3;
    if (op == 0) {
      auto got = a.Allocate(1 + rng() % 4);
      if (got.ok()) refs.insert(got->begin(), got->end());
    } else if (op == 1 && !refs.empty()) {
      auto it = std::next(refs.begin(), rng() % refs.size());
      a.AddRef(*it);
      refs.insert(*it);
    } else if (!refs.empty()) {
      auto it = std::next(refs.begin(), rng() % refs.size());
      const uint32_t b = *it;
      refs.erase(it);
      CHECK(a.Release(b) == (refs.count(b) == 0));
    }
    REQUIRE(a.num_free() + a.num_used() == a.capacity());
  }
  std::set<uint32_t> distinct(refs.begin(), refs.end());
  CHECK(a.num_used() == distinct.size());
  for (uint32_t b : distinct) CHECK(a.refcount(b) == refs.count(b));
  REQUIRE(a.CheckInvariants().ok());
}

}  // namespace
}  // namespace cachemgr

namespace cachemgr {
namespace {

const absl::Time kT0 = absl::UnixEpoch() + absl::Hours(1);

TEST_CASE("quarantined blocks are neither used nor free until their time", "[cpu]") {
  BlockAllocator a(6);
  auto blocks = *a.Allocate(4);  // 0 1 2 3
  a.AddRef(blocks[1]);           // shared: its first release is not its last
  CHECK(a.ReleaseToQuarantine(blocks[0], kT0 + absl::Seconds(10)));
  CHECK_FALSE(a.ReleaseToQuarantine(blocks[1], kT0 + absl::Seconds(10)));
  CHECK(a.ReleaseToQuarantine(blocks[1], kT0 + absl::Seconds(10)));
  CHECK(a.num_quarantined() == 2);
  CHECK(a.num_used() == 2);
  CHECK(a.num_free() == 2);
  REQUIRE(a.CheckInvariants().ok());
  // Only the two never-used blocks can be had.
  auto more = a.Allocate(3);
  REQUIRE(more.status().code() == absl::StatusCode::kResourceExhausted);
  auto two = *a.Allocate(2);
  CHECK(std::set<uint32_t>(two.begin(), two.end()) == std::set<uint32_t>{4, 5});

  CHECK(a.EndQuarantine(kT0 + absl::Seconds(9)) == 0);
  CHECK(a.num_quarantined() == 2);
  CHECK(a.EndQuarantine(kT0 + absl::Seconds(10)) == 2);
  CHECK(a.num_quarantined() == 0);
  CHECK(a.num_free() == 2);
  auto back = *a.Allocate(2);
  CHECK(std::set<uint32_t>(back.begin(), back.end()) == std::set<uint32_t>{0, 1});
  REQUIRE(a.CheckInvariants().ok());
}

TEST_CASE("quarantine batches end in order", "[cpu]") {
  BlockAllocator a(4);
  auto blocks = *a.Allocate(4);
  a.ReleaseToQuarantine(blocks[0], kT0 + absl::Seconds(1));
  a.ReleaseToQuarantine(blocks[1], kT0 + absl::Seconds(1));
  a.ReleaseToQuarantine(blocks[2], kT0 + absl::Seconds(5));
  CHECK(a.Release(blocks[3]));  // a plain release frees at once
  CHECK(a.num_free() == 1);
  CHECK(a.EndQuarantine(kT0 + absl::Seconds(2)) == 2);
  CHECK(a.num_quarantined() == 1);
  CHECK(a.EndQuarantine(kT0 + absl::Seconds(5)) == 1);
  CHECK(a.num_free() == 4);
  REQUIRE(a.CheckInvariants().ok());
}

}  // namespace
}  // namespace cachemgr
