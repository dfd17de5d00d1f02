#include "client/kv_mem_pool/kv_mem_pool.h"

#include <type_traits>

#include "client/kv_mem_pool/region_allocator.h"

#define CACHEMGR_KV_POOL_EXPORT __attribute__((visibility("default")))

namespace {

using cachemgr::kv_mem_pool::RegionAllocator;
using cachemgr::kv_mem_pool::RegionStats;

static_assert(CACHEMGR_KV_POOL_ALIGNMENT == cachemgr::kv_mem_pool::kAlignment);
static_assert(std::is_standard_layout_v<CachemgrKvPoolStats>);

// Process-wide: PyTorch calls the two allocation functions by name, with no context argument.
// Never destroyed, so that frees PyTorch makes while the process exits stay harmless.
RegionAllocator& Region() {
  static RegionAllocator* region = new RegionAllocator;
  return *region;
}

}  // namespace

extern "C" {

CACHEMGR_KV_POOL_EXPORT void* cachemgr_kv_malloc(ssize_t size, int device, void* stream) {
  (void)stream;
  return Region().Allocate(static_cast<int64_t>(size), device);
}

CACHEMGR_KV_POOL_EXPORT void cachemgr_kv_free(void* ptr, ssize_t size, int device, void* stream) {
  (void)size;
  (void)device;
  (void)stream;
  Region().Free(ptr);
}

CACHEMGR_KV_POOL_EXPORT int cachemgr_kv_pool_configure(int device, uint64_t base, uint64_t bytes) {
  return Region().Configure(device, base, bytes);
}

CACHEMGR_KV_POOL_EXPORT int cachemgr_kv_pool_reset(void) { return Region().Reset(); }

CACHEMGR_KV_POOL_EXPORT void cachemgr_kv_pool_get_stats(CachemgrKvPoolStats* out) {
  if (out == nullptr) return;
  const RegionStats s = Region().stats();
  out->device = s.device;
  out->base = s.base;
  out->region_bytes = s.region_bytes;
  out->bytes_in_use = s.bytes_in_use;
  out->peak_bytes_in_use = s.peak_bytes_in_use;
  out->live_allocations = s.live_allocations;
  out->total_allocations = s.total_allocations;
  out->failed_allocations = s.failed_allocations;
  out->rejected_frees = s.rejected_frees;
  out->largest_free_bytes = s.largest_free_bytes;
}

CACHEMGR_KV_POOL_EXPORT uint64_t cachemgr_kv_pool_stats_size(void) {
  return sizeof(CachemgrKvPoolStats);
}

}  // extern "C"
