"""Zero-copy device views of a CUDA pool (the daemon's --backend=cuda), in vLLM's layouts.

The pool's regions are opened once per Session through the CUDA driver, loaded with ctypes (no
CUDA Python package needed):
  SHARE_METHOD_CUDA_VMM_FD      cuMemImportFromShareableHandle on the fd the share channel
                                passed, then cuMemAddressReserve + cuMemMap + cuMemSetAccess;
  SHARE_METHOD_CUDA_IPC_HANDLE  cuIpcOpenMemHandle on MemoryRegion.cuda_ipc_handle.
Each layer is then exposed as a device array: a PyTorch tensor when torch is installed (through
__cuda_array_interface__, zero copy), else a CuPy array, else the raw interface object (any
library that accepts __cuda_array_interface__ can wrap it). Shapes are those of HostPool:
  flash_attn:  [2, num_blocks, block_size, num_kv_heads, head_dim]
  flashinfer:  [num_blocks, 2, block_size, num_kv_heads, head_dim]
bf16 layers are torch.bfloat16 tensors under torch (raw uint16 otherwise).

Ordering: the daemon finishes its kernels before an RPC returns. The engine's own writes must be
complete before compress() or park() read the pool: either synchronise (torch.cuda.synchronize()
or the stream), or call record_kv_writes(stream) after enqueueing them, which records a CUDA
interprocess event the daemon waits for (its handle goes with every later compress and park)."""

import ctypes
import ctypes.util
import os
from typing import Callable, List, Optional, Sequence, Tuple

from .types import ModelSpec

CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
CU_EVENT_DISABLE_TIMING = 0x2
CU_EVENT_INTERPROCESS = 0x4

_TYPESTR = {"fp16": "<f2", "bf16": "<u2", "fp32": "<f4"}
_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", _Location), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class _IpcHandle(ctypes.Structure):  # CUipcMemHandle
    _fields_ = [("reserved", ctypes.c_char * 64)]


class CudaError(RuntimeError):
    pass


class CudaDriver:
    """The few libcuda entry points the device pool needs, with errors as CudaError."""

    def __init__(self, lib=None):
        if lib is None:
            name = ctypes.util.find_library("cuda") or "libcuda.so.1"
            try:
                lib = ctypes.CDLL(name)
            except OSError as e:
                raise CudaError(f"cannot load the CUDA driver ({name}): {e}") from e
        self._lib = lib
        self._check(lib.cuInit(0), "cuInit")

    def _check(self, result, what):
        if result != 0:
            name = ctypes.c_char_p()
            try:
                self._lib.cuGetErrorName(result, ctypes.byref(name))
            except Exception:  # noqa: BLE001 - best effort for the message
                pass
            raise CudaError(f"{what}: {name.value.decode() if name.value else result}")

    def device_ordinal(self, uuid: str) -> int:
        count = ctypes.c_int()
        self._check(self._lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        seen = []
        for ordinal in range(count.value):
            dev = ctypes.c_int()
            self._check(self._lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
            raw = (ctypes.c_ubyte * 16)()
            self._check(self._lib.cuDeviceGetUuid(raw, dev), "cuDeviceGetUuid")
            b = bytes(raw).hex()
            text = f"GPU-{b[0:8]}-{b[8:12]}-{b[12:16]}-{b[16:20]}-{b[20:32]}"
            if text == uuid:
                return ordinal
            seen.append(text)
        raise CudaError(f"the pool lives on {uuid}, which this process does not see "
                        f"(visible: {', '.join(seen) or 'none'}; check CUDA_VISIBLE_DEVICES)")

    def map_vmm(self, ordinal: int, fd: int, size: int) -> int:
        handle = ctypes.c_ulonglong()
        self._check(self._lib.cuMemImportFromShareableHandle(
            ctypes.byref(handle), ctypes.c_void_p(fd), CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
            "cuMemImportFromShareableHandle")
        prop = _AllocationProp()
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location = _Location(CU_MEM_LOCATION_TYPE_DEVICE, ordinal)
        granularity = ctypes.c_size_t()
        self._check(self._lib.cuMemGetAllocationGranularity(
            ctypes.byref(granularity), ctypes.byref(prop), CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity")
        ptr = ctypes.c_ulonglong()
        self._check(self._lib.cuMemAddressReserve(ctypes.byref(ptr), ctypes.c_size_t(size),
                                                  granularity, ctypes.c_ulonglong(0),
                                                  ctypes.c_ulonglong(0)), "cuMemAddressReserve")
        self._check(self._lib.cuMemMap(ptr, ctypes.c_size_t(size), ctypes.c_size_t(0), handle,
                                       ctypes.c_ulonglong(0)), "cuMemMap")
        access = _AccessDesc(_Location(CU_MEM_LOCATION_TYPE_DEVICE, ordinal),
                             CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        self._check(self._lib.cuMemSetAccess(ptr, ctypes.c_size_t(size), ctypes.byref(access),
                                             ctypes.c_size_t(1)), "cuMemSetAccess")
        self._vmm = getattr(self, "_vmm", {})
        self._vmm[ptr.value] = (handle.value, size, None)  # (pool handle, bytes, scratch)
        return ptr.value

    def unmap_vmm(self, ptr: int) -> None:
        handle, size, scratch = self._vmm.pop(ptr)
        if scratch is not None:  # revoked: the range holds granules of the scratch allocation
            scratch_handle, granularity, mapped = scratch
            for off in range(0, mapped, granularity):
                self._lib.cuMemUnmap(ctypes.c_ulonglong(ptr + off), ctypes.c_size_t(granularity))
            self._lib.cuMemRelease(ctypes.c_ulonglong(scratch_handle))
        else:
            self._lib.cuMemUnmap(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size))
        self._lib.cuMemAddressFree(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size))
        if handle is not None:
            self._lib.cuMemRelease(ctypes.c_ulonglong(handle))

    def revoke_vmm(self, ordinal: int, ptr: int) -> None:
        """Unmaps the pool allocation from [ptr, ptr + size) and releases it, keeping the range
        reserved; then backs the range with one private granule mapped over every granule, so
        stale device stores land in scratch instead of faulting. If the scratch mapping fails
        the range stays unmapped (stale accesses fault), which is safe too."""
        handle, size, scratch = self._vmm[ptr]
        if handle is None:
            return
        self._check(self._lib.cuMemUnmap(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size)),
                    "cuMemUnmap")
        self._lib.cuMemRelease(ctypes.c_ulonglong(handle))
        self._vmm[ptr] = (None, size, None)
        prop = _AllocationProp()
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location = _Location(CU_MEM_LOCATION_TYPE_DEVICE, ordinal)
        granularity = ctypes.c_size_t()
        scratch_handle = ctypes.c_ulonglong()
        if (self._lib.cuMemGetAllocationGranularity(ctypes.byref(granularity), ctypes.byref(prop),
                                                    CU_MEM_ALLOC_GRANULARITY_MINIMUM) != 0
                or granularity.value == 0 or size % granularity.value != 0
                or self._lib.cuMemCreate(ctypes.byref(scratch_handle),
                                         ctypes.c_size_t(granularity.value), ctypes.byref(prop),
                                         ctypes.c_ulonglong(0)) != 0):
            return
        g = granularity.value
        mapped = 0
        for off in range(0, size, g):
            if self._lib.cuMemMap(ctypes.c_ulonglong(ptr + off), ctypes.c_size_t(g),
                                  ctypes.c_size_t(0), scratch_handle,
                                  ctypes.c_ulonglong(0)) != 0:
                break
            mapped = off + g
        self._vmm[ptr] = (None, size, (scratch_handle.value, g, mapped))
        if mapped == size:
            access = _AccessDesc(_Location(CU_MEM_LOCATION_TYPE_DEVICE, ordinal),
                                 CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
            self._lib.cuMemSetAccess(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size),
                                     ctypes.byref(access), ctypes.c_size_t(1))

    def open_ipc(self, ordinal: int, handle: bytes) -> int:
        if len(handle) != 64:
            raise CudaError(f"the daemon sent a {len(handle)}-byte CUDA IPC handle (want 64)")
        self._make_current(ordinal)
        ptr = ctypes.c_ulonglong()
        self._check(self._lib.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), _IpcHandle(handle),
                                                    CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                    "cuIpcOpenMemHandle")
        return ptr.value

    def close_ipc(self, ptr: int) -> None:
        self._lib.cuIpcCloseMemHandle(ctypes.c_ulonglong(ptr))

    def create_ipc_event(self, ordinal: int):
        """An interprocess event (timing disabled) on the device: (event, 64-byte handle)."""
        self._make_current(ordinal)
        event = ctypes.c_void_p()
        self._check(self._lib.cuEventCreate(ctypes.byref(event),
                                            CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS),
                    "cuEventCreate")
        handle = _IpcHandle()
        self._check(self._lib.cuIpcGetEventHandle(ctypes.byref(handle), event),
                    "cuIpcGetEventHandle")
        return event.value, bytes(handle.reserved)

    def record_event(self, event: int, stream: int) -> None:
        self._check(self._lib.cuEventRecord(ctypes.c_void_p(event), ctypes.c_void_p(stream)),
                    "cuEventRecord")

    def destroy_event(self, event: int) -> None:
        self._lib.cuEventDestroy_v2(ctypes.c_void_p(event))

    def _make_current(self, ordinal: int) -> None:
        ctx = ctypes.c_void_p()
        dev = ctypes.c_int()
        self._check(self._lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        self._check(self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev),
                    "cuDevicePrimaryCtxRetain")
        self._check(self._lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


class _DeviceArray:
    """A device buffer described by __cuda_array_interface__ (version 3)."""

    def __init__(self, ptr: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr,
                                         "data": (ptr, False), "strides": None, "version": 3,
                                         "stream": None}


def _default_wrap(model: ModelSpec) -> Callable[[_DeviceArray], object]:
    try:
        import torch  # noqa: F401

        def wrap(array):
            t = torch.as_tensor(array, device="cuda")
            return t.view(torch.bfloat16) if model.dtype == "bf16" else t
        return wrap
    except ImportError:
        pass
    try:
        import cupy

        return cupy.asarray
    except ImportError:
        return lambda array: array


class DevicePool:
    """The pool of one model on a GPU, opened in this process. Same accessors as HostPool
    (layer, key_cache, value_cache) returning device arrays; close() unmaps."""

    def __init__(self, model: ModelSpec, num_blocks: int, device: str, share_method: str,
                 regions: Sequence[tuple], layer_places: Sequence[tuple],
                 driver: Optional[CudaDriver] = None,
                 wrap: Optional[Callable[[_DeviceArray], object]] = None):
        """regions: per region (fd or None, bytes, ipc_handle bytes); share_method "vmm_fd" or
        "ipc_handle"; layer_places: (region, offset, bytes) per layer. Takes ownership of the
        fds: they are closed when this returns or raises (an imported allocation needs none)."""
        self.model = model
        self.num_blocks = num_blocks
        self.device = device
        self.on_device = True
        self._driver = driver or CudaDriver()
        self._share = share_method
        self._bases: List[int] = []
        self._region_bytes = [size for _, size, _ in regions]
        self.revoked = False
        self._event: Optional[int] = None
        self.write_event_handle = b""  # set by the first record_kv_writes
        try:
            self.ordinal = self._driver.device_ordinal(device)
            for fd, size, handle in regions:
                if share_method == "vmm_fd":
                    self._bases.append(self._driver.map_vmm(self.ordinal, fd, size))
                else:
                    self._bases.append(self._driver.open_ipc(self.ordinal, handle))
        except Exception:
            self.close()
            raise
        finally:
            for fd, _, _ in regions:
                if fd is not None:
                    os.close(fd)
        shape = ((2, num_blocks) if model.layout == "flash_attn" else (num_blocks, 2)) + (
            model.block_size, model.num_kv_heads, model.head_dim)
        wrap = wrap or _default_wrap(model)
        self._layers = []
        for region, offset, nbytes in layer_places:
            want = _ITEMSIZE[model.dtype]
            for d in shape:
                want *= d
            if nbytes != want:
                raise CudaError(f"layer of {nbytes} bytes, the model implies {want}")
            self._layers.append(wrap(_DeviceArray(self._bases[region] + offset, shape,
                                                  _TYPESTR[model.dtype])))

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def share_method(self) -> str:
        """"vmm_fd" or "ipc_handle": how the regions were opened."""
        return self._share

    @property
    def regions(self) -> List[Tuple[int, int]]:
        """(device address, bytes) of each region as mapped in this process; empty once
        closed."""
        return list(zip(self._bases, self._region_bytes))

    def layer(self, layer: int):
        return self._layers[layer]

    def key_cache(self, layer: int):
        t = self._layers[layer]
        return t[0] if self.model.layout == "flash_attn" else t[:, 0]

    def value_cache(self, layer: int):
        t = self._layers[layer]
        return t[1] if self.model.layout == "flash_attn" else t[:, 1]

    def record_kv_writes(self, stream: int = 0) -> None:
        """Records this pool's interprocess write event on `stream` (a CUstream / cudaStream_t
        as an int, e.g. torch.cuda.current_stream().cuda_stream; 0: the legacy default stream)
        after the KV writes enqueued there. The event is created at the first call; its handle
        (write_event_handle) then goes with every compress and park, and the daemon waits for
        the latest record before it reads the pool."""
        if self._event is None:
            self._event, self.write_event_handle = self._driver.create_ipc_event(self.ordinal)
        self._driver.record_event(self._event, stream)

    def revoke(self) -> None:
        """Cuts the device arrays off the pool (the session lost its lease): VMM mappings are
        unmapped and released, the range kept reserved and backed by a private scratch granule
        (stale stores land there); legacy IPC mappings are closed (stale device pointers then
        fault, or reach a later allocation of this process that reuses the range, never the
        pool). Idempotent."""
        if self.revoked:
            return
        for base in self._bases:
            if self._share == "vmm_fd":
                self._driver.revoke_vmm(self.ordinal, base)
            else:
                self._driver.close_ipc(base)
        self.revoked = True

    def close(self) -> None:
        if self._event is not None:
            self._driver.destroy_event(self._event)
            self._event = None
            self.write_event_handle = b""
        self._layers = []
        for base in self._bases:
            if self._share == "vmm_fd":
                self._driver.unmap_vmm(base)
            elif not self.revoked:
                self._driver.close_ipc(base)
        self._bases = []
