// libcachemgr_kv_mem_pool: a region allocator for PyTorch's CUDAPluggableAllocator, so that a
// torch.cuda.MemPool carves its tensors out of one device region given to it: in the vLLM
// connector (kv_mem_pool: true, docs/VLLM.md), the CUDA pool cachemgrd lends the worker, which
// then holds every KV cache tensor vLLM allocates.
//
//   lib = "…/libcachemgr_kv_mem_pool.so"
//   cachemgr_kv_pool_configure(device, base, bytes)          (ctypes; cachemgr/kv_mem_pool.py)
//   alloc = torch.cuda.memory.CUDAPluggableAllocator(lib, "cachemgr_kv_malloc",
//                                                    "cachemgr_kv_free")
//   pool = torch.cuda.MemPool(alloc.allocator())
//   with torch.cuda.use_mem_pool(pool): ...                  (tensors come from the region)
//
// Contract:
// - One region per process (the library's state is process-wide; ctypes and PyTorch's
//   CUDAPluggableAllocator dlopen the same file and so share it), on one device.
// - cachemgr_kv_malloc returns a 256-byte-aligned (CACHEMGR_KV_POOL_ALIGNMENT) pointer into the
//   region, or nullptr when the region cannot hold `size` more bytes, when `device` is not the
//   region's, or before configure. It never allocates device memory any other way (no
//   cudaMalloc fallback): PyTorch turns nullptr into torch.OutOfMemoryError. The stream is
//   ignored (allocations are not stream-ordered; PyTorch's caching allocator orders reuse).
// - cachemgr_kv_free takes back an allocation by its start pointer (size, device and stream are
//   not needed). A pointer that is not a live allocation of the region (never handed out,
//   freed twice, another allocator's) is ignored and counted (rejected_frees); nothing is
//   logged and nothing aborts: the region's books stay as they were.
// - The region's memory is never read or written here (only addresses are computed), so no
//   CUDA header or library is needed.
// Thread-safe: every function may be called from any thread (one mutex).
#ifndef CACHEMGR_CLIENT_KV_MEM_POOL_KV_MEM_POOL_H_
#define CACHEMGR_CLIENT_KV_MEM_POOL_KV_MEM_POOL_H_

#include <stdint.h>
#include <sys/types.h>  // ssize_t

#define CACHEMGR_KV_POOL_ALIGNMENT 256

#ifdef __cplusplus
extern "C" {
#endif

// Counters of the region; see RegionStats (region_allocator.h) for each field.
typedef struct CachemgrKvPoolStats {
  int64_t device;
  uint64_t base;
  uint64_t region_bytes;
  uint64_t bytes_in_use;
  uint64_t peak_bytes_in_use;
  uint64_t live_allocations;
  uint64_t total_allocations;
  uint64_t failed_allocations;
  uint64_t rejected_frees;
  uint64_t largest_free_bytes;
} CachemgrKvPoolStats;

// PyTorch's CUDAPluggableAllocator signatures.
void* cachemgr_kv_malloc(ssize_t size, int device, void* stream);
void cachemgr_kv_free(void* ptr, ssize_t size, int device, void* stream);

// Makes [base, base + bytes) on CUDA device `device` (an ordinal of this process) the region.
// 0; -EINVAL for a bad region (device < 0, base 0 or not 256-aligned, under 256 bytes, an
// overflowing end); -EBUSY while allocations of the previous region are live.
int cachemgr_kv_pool_configure(int device, uint64_t base, uint64_t bytes);
// Forgets the region: 0, or -EBUSY while allocations are live.
int cachemgr_kv_pool_reset(void);
// A consistent snapshot of the counters into *out (ignored when out is null).
void cachemgr_kv_pool_get_stats(CachemgrKvPoolStats* out);
// sizeof(CachemgrKvPoolStats), for bindings to check their copy of the struct.
uint64_t cachemgr_kv_pool_stats_size(void);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // CACHEMGR_CLIENT_KV_MEM_POOL_KV_MEM_POOL_H_
