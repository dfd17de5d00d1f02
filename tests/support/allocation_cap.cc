#include "tests/support/allocation_cap.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define CACHEMGR_SANITIZER_OWNS_NEW 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define CACHEMGR_SANITIZER_OWNS_NEW 1
#endif

namespace cachemgr::testing {
namespace {

std::atomic<size_t> g_max_bytes{SIZE_MAX};

}  // namespace

AllocationCap::AllocationCap(size_t max_bytes) { g_max_bytes.store(max_bytes); }
AllocationCap::~AllocationCap() { g_max_bytes.store(SIZE_MAX); }

bool AllocationCap::active() {
#if defined(CACHEMGR_SANITIZER_OWNS_NEW)
  return false;
#else
  return true;
#endif
}

}  // namespace cachemgr::testing

#if !defined(CACHEMGR_SANITIZER_OWNS_NEW)
// The replaceable allocation functions ([new.delete.single]); the array, nothrow and sized
// forms of the standard library call these.
void* operator new(size_t bytes) {
  if (bytes > cachemgr::testing::g_max_bytes.load()) throw std::bad_alloc();
  if (void* p = std::malloc(bytes == 0 ? 1 : bytes)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
#endif
