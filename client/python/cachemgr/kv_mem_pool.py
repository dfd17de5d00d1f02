"""The KV mem-pool allocator (client/kv_mem_pool/kv_mem_pool.h) from Python.

A small C library that PyTorch's CUDAPluggableAllocator calls to carve tensors out of one device
region it was given (the vLLM connector gives it a CUDA pool of cachemgrd: kv_mem_pool in
docs/VLLM.md). `pip install ./client/python` builds it into this package
(cachemgr/_kv_mem_pool*.so); CMake builds the same sources as libcachemgr_kv_mem_pool.so.

    lib = KvMemPoolLibrary()                      # the packaged library, or a path
    lib.configure(device, base_address, nbytes)   # the region (device memory, not touched here)
    pool = torch.cuda.MemPool(lib.torch_allocator().allocator())
    with torch.cuda.use_mem_pool(pool):
        kv = torch.empty(n, dtype=torch.int8, device="cuda")   # inside the region, or OOM

The library's state is per process: ctypes and PyTorch load the same file, so they share one
region. Allocations are 256-byte aligned; an exhausted region answers nullptr, which PyTorch
raises as torch.OutOfMemoryError (never a cudaMalloc elsewhere); a free of a pointer the region
did not hand out is ignored and counted (rejected_frees).
"""

import ctypes
import dataclasses
import errno
import importlib.machinery
import os
from typing import Optional

ALLOC_FN = "cachemgr_kv_malloc"
FREE_FN = "cachemgr_kv_free"
ALIGNMENT = 256


class _Stats(ctypes.Structure):  # CachemgrKvPoolStats
    _fields_ = [("device", ctypes.c_int64), ("base", ctypes.c_uint64),
                ("region_bytes", ctypes.c_uint64), ("bytes_in_use", ctypes.c_uint64),
                ("peak_bytes_in_use", ctypes.c_uint64), ("live_allocations", ctypes.c_uint64),
                ("total_allocations", ctypes.c_uint64), ("failed_allocations", ctypes.c_uint64),
                ("rejected_frees", ctypes.c_uint64), ("largest_free_bytes", ctypes.c_uint64)]


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """The region's counters (RegionStats in region_allocator.h): device -1 and region_bytes 0
    before configure; bytes count allocations rounded up to 256."""
    device: int
    base: int
    region_bytes: int
    bytes_in_use: int
    peak_bytes_in_use: int
    live_allocations: int
    total_allocations: int
    failed_allocations: int
    rejected_frees: int
    largest_free_bytes: int

    def contains(self, address: int, nbytes: int = 1) -> bool:
        """Whether [address, address + nbytes) lies in the region."""
        return self.base <= address and address + nbytes <= self.base + self.region_bytes


def packaged_library_path() -> Optional[str]:
    """The library pip built into this package, or None (installed without a C++ compiler)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_kv_mem_pool" + suffix)
        if os.path.exists(path):
            return path
    return None


class KvMemPoolLibrary:
    """The loaded library. `path`: a libcachemgr_kv_mem_pool.so (e.g. CMake's); None: the one
    built into this package. Raises FileNotFoundError when there is none, OSError when it does
    not load."""

    def __init__(self, path: Optional[str] = None):
        if path is None:
            path = packaged_library_path()
            if path is None:
                raise FileNotFoundError(
                    "the cachemgr package was installed without its KV mem-pool library "
                    "(cachemgr/_kv_mem_pool*.so: pip builds it when a C++ compiler is "
                    "installed; reinstall with one, or name a libcachemgr_kv_mem_pool.so built "
                    "by CMake)")
        self.path = os.path.abspath(path)
        lib = ctypes.CDLL(self.path)
        lib.cachemgr_kv_malloc.restype = ctypes.c_void_p
        lib.cachemgr_kv_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
        lib.cachemgr_kv_free.restype = None
        lib.cachemgr_kv_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int,
                                         ctypes.c_void_p]
        lib.cachemgr_kv_pool_configure.restype = ctypes.c_int
        lib.cachemgr_kv_pool_configure.argtypes = [ctypes.c_int, ctypes.c_uint64,
                                                   ctypes.c_uint64]
        lib.cachemgr_kv_pool_reset.restype = ctypes.c_int
        lib.cachemgr_kv_pool_reset.argtypes = []
        lib.cachemgr_kv_pool_get_stats.restype = None
        lib.cachemgr_kv_pool_get_stats.argtypes = [ctypes.POINTER(_Stats)]
        lib.cachemgr_kv_pool_stats_size.restype = ctypes.c_uint64
        lib.cachemgr_kv_pool_stats_size.argtypes = []
        if lib.cachemgr_kv_pool_stats_size() != ctypes.sizeof(_Stats):
            raise OSError(f"{self.path}: CachemgrKvPoolStats is "
                          f"{lib.cachemgr_kv_pool_stats_size()} bytes, this module expects "
                          f"{ctypes.sizeof(_Stats)} (a library from another version)")
        self._lib = lib

    def configure(self, device: int, base: int, nbytes: int) -> None:
        """Makes [base, base + nbytes) on CUDA device `device` the region. ValueError for a bad
        region; RuntimeError while allocations of the previous region are live."""
        rc = self._lib.cachemgr_kv_pool_configure(device, base, nbytes)
        if rc == -errno.EBUSY:
            raise RuntimeError(f"the KV mem-pool region still has "
                               f"{self.stats().live_allocations} live allocations")
        if rc != 0:
            raise ValueError(f"not a usable region: device {device}, base {base:#x} (must be "
                             f"{ALIGNMENT}-byte aligned), {nbytes} bytes")

    def reset(self) -> bool:
        """Forgets the region; False (nothing changed) while allocations are live."""
        return self._lib.cachemgr_kv_pool_reset() == 0

    def stats(self) -> PoolStats:
        raw = _Stats()
        self._lib.cachemgr_kv_pool_get_stats(ctypes.byref(raw))
        return PoolStats(**{name: getattr(raw, name) for name, _ in _Stats._fields_})

    def malloc(self, size: int, device: int) -> int:
        """What PyTorch calls: an address in the region, or 0."""
        return self._lib.cachemgr_kv_malloc(size, device, None) or 0

    def free(self, address: int) -> None:
        self._lib.cachemgr_kv_free(address, 0, 0, None)

    def torch_allocator(self):
        """A torch.cuda.memory.CUDAPluggableAllocator over this library (same file, so the same
        region): pass its .allocator() to torch.cuda.MemPool."""
        from torch.cuda.memory import CUDAPluggableAllocator
        return CUDAPluggableAllocator(self.path, ALLOC_FN, FREE_FN)
