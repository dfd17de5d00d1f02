// AllocationCap: while one is alive, any single operator-new allocation above its limit throws
// std::bad_alloc, as a real machine would for a request of exabytes. For tests that a parser
// sizes its allocations by the bytes it actually has, not by a length or count field it read:
// a parser that trusts the field then fails the test with an exception instead of allocating.
//
// Linking this file into a test binary replaces its global operator new / delete (malloc and
// free; behaviour unchanged while no cap is alive). Under a sanitizer, whose runtime owns
// operator new, the cap is inactive (active() is false) and allocations are not limited.
// Not for concurrent use: one cap at a time, set and cleared on the test's thread.
#pragma once

#include <cstddef>

namespace cachemgr::testing {

class AllocationCap {
 public:
  explicit AllocationCap(size_t max_bytes);
  ~AllocationCap();
  AllocationCap(const AllocationCap&) = delete;
  AllocationCap& operator=(const AllocationCap&) = delete;

  // Whether allocations are really limited in this build.
  static bool active();
};

}  // namespace cachemgr::testing
