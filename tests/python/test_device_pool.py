"""cachemgr.device_pool without a GPU: the mapping logic driven by a recording fake of the CUDA
driver (the real one needs a GPU; scripts/gpu-check.sh runs the real path), and the ctypes
structures checked against the CUDA toolkit's own cuda.h by compiling a probe."""

import ctypes
import os
import pathlib
import subprocess

import pytest

from cachemgr.device_pool import (CudaDriver, CudaError, DevicePool, _AccessDesc,
                                  _AllocationProp, _IpcHandle)
from cachemgr.types import ModelSpec

CUDA_INCLUDE = pathlib.Path("/usr/local/cuda/include")


class FakeDriver:
    def __init__(self, uuid="GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", fail_map_at=None):
        self.uuid = uuid
        self.calls = []
        self.next_ptr = 0x7F0000000000
        self.fail_map_at = fail_map_at
        self.mapped = {}

    def device_ordinal(self, uuid):
        self.calls.append(("ordinal", uuid))
        if uuid != self.uuid:
            raise CudaError(f"the pool lives on {uuid}, which this process does not see")
        return 3

    def map_vmm(self, ordinal, fd, size):
        self.calls.append(("map_vmm", ordinal, os.fstat(fd).st_size, size))
        if self.fail_map_at == len(self.mapped):
            raise CudaError("cuMemMap: CUDA_ERROR_OUT_OF_MEMORY")
        ptr = self.next_ptr
        self.next_ptr += 1 << 40
        self.mapped[ptr] = size
        return ptr

    def unmap_vmm(self, ptr):
        self.calls.append(("unmap_vmm", ptr))
        del self.mapped[ptr]

    def revoke_vmm(self, ordinal, ptr):
        self.calls.append(("revoke_vmm", ordinal, ptr))

    def open_ipc(self, ordinal, handle):
        self.calls.append(("open_ipc", ordinal, handle))
        ptr = self.next_ptr
        self.next_ptr += 1 << 40
        self.mapped[ptr] = len(handle)
        return ptr

    def close_ipc(self, ptr):
        self.calls.append(("close_ipc", ptr))
        del self.mapped[ptr]

    def create_ipc_event(self, ordinal):
        self.calls.append(("create_event", ordinal))
        self.events = getattr(self, "events", set()) | {0xE7}
        return 0xE7, bytes(range(100, 164))

    def record_event(self, event, stream):
        self.calls.append(("record_event", event, stream))

    def destroy_event(self, event):
        self.calls.append(("destroy_event", event))
        self.events.remove(event)


def model(layout="flash_attn", dtype="bf16"):
    return ModelSpec(name="m", num_layers=3, num_q_heads=8, num_kv_heads=2, head_dim=64,
                     dtype=dtype, block_size=16, layout=layout)


def memfd(size):
    fd = os.memfd_create("fake-vmm")
    os.ftruncate(fd, size)
    return fd


def closed(fd):
    try:
        os.fstat(fd)
        return False
    except OSError:
        return True


def layer_bytes(m, blocks):
    return 2 * blocks * m.block_size * m.num_kv_heads * m.head_dim * (4 if m.dtype == "fp32" else 2)


@pytest.mark.parametrize("layout", ["flash_attn", "flashinfer"])
@pytest.mark.parametrize("dtype,typestr", [("fp16", "<f2"), ("bf16", "<u2"), ("fp32", "<f4")])
def test_vmm_pool_views(layout, dtype, typestr):
    m = model(layout, dtype)
    blocks = 10
    lb = layer_bytes(m, blocks)
    stride = 2 << 20
    fd = memfd(3 * stride)
    driver = FakeDriver()
    pool = DevicePool(m, blocks, driver.uuid, "vmm_fd", [(fd, 3 * stride, b"")],
                      [(0, l * stride, lb) for l in range(3)], driver=driver,
                      wrap=lambda a: a)
    assert closed(fd), "the pool closes the fd once the allocation is imported"
    assert driver.calls[:2] == [("ordinal", driver.uuid), ("map_vmm", 3, 3 * stride, 3 * stride)]
    (base,) = driver.mapped
    shape = (2, blocks, 16, 2, 64) if layout == "flash_attn" else (blocks, 2, 16, 2, 64)
    for l in range(3):
        iface = pool.layer(l).__cuda_array_interface__
        assert iface["data"] == (base + l * stride, False)
        assert iface["shape"] == shape and iface["typestr"] == typestr
        assert iface["strides"] is None and iface["version"] == 3
    assert pool.num_layers == 3 and pool.ordinal == 3 and pool.on_device
    assert pool.share_method == "vmm_fd" and pool.regions == [(base, 3 * stride)]
    pool.close()
    assert driver.mapped == {} and ("unmap_vmm", base) in driver.calls
    assert pool.regions == []


def test_ipc_pool_opens_the_handles():
    m = model()
    driver = FakeDriver()
    handle = bytes(range(64))
    lb = layer_bytes(m, 4)
    pool = DevicePool(m, 4, driver.uuid, "ipc_handle", [(None, 3 * lb, handle)],
                      [(0, l * lb, lb) for l in range(3)], driver=driver, wrap=lambda a: a)
    assert ("open_ipc", 3, handle) in driver.calls
    pool.close()
    assert driver.mapped == {}


def test_write_event_is_created_once_recorded_per_call_and_destroyed_on_close():
    m = model()
    driver = FakeDriver()
    lb = layer_bytes(m, 4)
    pool = DevicePool(m, 4, driver.uuid, "ipc_handle", [(None, 3 * lb, bytes(64))],
                      [(0, l * lb, lb) for l in range(3)], driver=driver, wrap=lambda a: a)
    assert pool.write_event_handle == b""  # nothing to wait for until the first record
    pool.record_kv_writes(0x5A)
    pool.record_kv_writes()
    events = [c for c in driver.calls if c[0] in ("create_event", "record_event")]
    assert events == [("create_event", 3), ("record_event", 0xE7, 0x5A),
                      ("record_event", 0xE7, 0)]
    assert pool.write_event_handle == bytes(range(100, 164))
    pool.close()
    assert ("destroy_event", 0xE7) in driver.calls and driver.events == set()
    assert pool.write_event_handle == b""


def test_revoke_cuts_the_views_off_the_pool_once():
    m = model()
    lb = layer_bytes(m, 4)
    driver = FakeDriver()
    fd = memfd(3 * lb)
    pool = DevicePool(m, 4, driver.uuid, "vmm_fd", [(fd, 3 * lb, b"")],
                      [(0, l * lb, lb) for l in range(3)], driver=driver, wrap=lambda a: a)
    (base,) = driver.mapped
    pool.revoke()
    pool.revoke()
    assert pool.revoked and driver.calls.count(("revoke_vmm", 3, base)) == 1
    pool.close()  # the reserved range and its scratch go at close
    assert ("unmap_vmm", base) in driver.calls and driver.mapped == {}

    driver = FakeDriver()
    pool = DevicePool(m, 4, driver.uuid, "ipc_handle", [(None, 3 * lb, bytes(64))],
                      [(0, l * lb, lb) for l in range(3)], driver=driver, wrap=lambda a: a)
    (base,) = driver.mapped
    pool.revoke()
    assert ("close_ipc", base) in driver.calls and driver.mapped == {}
    pool.close()  # not closed twice
    assert driver.calls.count(("close_ipc", base)) == 1


class FakeLibcuda:
    """libcuda at the ctypes level: records calls, fills out-parameters, returns CUDA_SUCCESS."""

    GRANULARITY = 2 << 20

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name,) + tuple(_plain(a) for a in args))
            if name == "cuMemGetAllocationGranularity":
                args[0]._obj.value = self.GRANULARITY
            elif name in ("cuMemImportFromShareableHandle", "cuMemCreate"):
                args[0]._obj.value = 0x5C if name == "cuMemCreate" else 0x1A
            elif name == "cuMemAddressReserve":
                args[0]._obj.value = 0x7000_0000_0000
            return 0
        return call


def _plain(arg):
    value = getattr(arg, "value", None)
    return value if isinstance(value, int) else None


def test_revoking_a_vmm_mapping_backs_it_with_scratch_granules():
    lib = FakeLibcuda()
    driver = CudaDriver(lib)
    size = 3 * FakeLibcuda.GRANULARITY
    fd = memfd(16)
    ptr = driver.map_vmm(0, fd, size)
    os.close(fd)
    lib.calls.clear()
    driver.revoke_vmm(0, ptr)
    names = [c[0] for c in lib.calls]
    # The pool allocation is unmapped and released first; then one scratch granule is mapped
    # over each granule of the still reserved range, read-write.
    assert names[:2] == ["cuMemUnmap", "cuMemRelease"]
    assert lib.calls[0][1:] == (ptr, size) and lib.calls[1][1] == 0x1A
    assert names.count("cuMemCreate") == 1
    maps = [c for c in lib.calls if c[0] == "cuMemMap"]
    assert [m[1] for m in maps] == [ptr + i * FakeLibcuda.GRANULARITY for i in range(3)]
    assert all(m[2] == FakeLibcuda.GRANULARITY for m in maps)
    assert names[-1] == "cuMemSetAccess" and "cuMemAddressFree" not in names
    driver.revoke_vmm(0, ptr)  # once only
    assert names == [c[0] for c in lib.calls]
    lib.calls.clear()
    driver.unmap_vmm(ptr)
    names = [c[0] for c in lib.calls]
    assert names == ["cuMemUnmap"] * 3 + ["cuMemRelease", "cuMemAddressFree"]
    assert lib.calls[3][1] == 0x5C  # the scratch allocation; the pool's was released before


def test_failures_release_everything_and_say_why():
    m = model()
    lb = layer_bytes(m, 4)
    fds = [memfd(lb), memfd(lb)]
    driver = FakeDriver(fail_map_at=1)
    with pytest.raises(CudaError, match="OUT_OF_MEMORY"):
        DevicePool(m, 4, driver.uuid, "vmm_fd", [(fd, lb, b"") for fd in fds],
                   [(0, 0, lb), (1, 0, lb), (1, 0, lb)], driver=driver, wrap=lambda a: a)
    assert all(closed(fd) for fd in fds) and driver.mapped == {}

    fd = memfd(lb)
    with pytest.raises(CudaError, match="does not see"):
        DevicePool(m, 4, "GPU-other", "vmm_fd", [(fd, lb, b"")], [(0, 0, lb)] * 3,
                   driver=FakeDriver(), wrap=lambda a: a)
    assert closed(fd)

    fd = memfd(lb)
    with pytest.raises(CudaError, match="the model implies"):
        DevicePool(m, 4, driver.uuid, "vmm_fd", [(fd, lb, b"")], [(0, 0, lb - 2)] * 3,
                   driver=FakeDriver(), wrap=lambda a: a)
    assert closed(fd)


def test_ctypes_structures_match_cuda_h(tmp_path):
    assert (CUDA_INCLUDE / "cuda.h").exists(), "the CUDA toolkit is installed in CI"
    probe = tmp_path / "probe.c"
    probe.write_text(r"""
#include <cuda.h>
#include <stddef.h>
#include <stdio.h>
int main(void) {
  printf("%zu %zu %zu %zu %zu %zu\n", sizeof(CUmemAllocationProp),
         offsetof(CUmemAllocationProp, location), offsetof(CUmemAllocationProp, allocFlags),
         sizeof(CUmemAccessDesc), offsetof(CUmemAccessDesc, flags), sizeof(CUipcMemHandle));
  printf("%d %d %d %d %d\n", CU_MEM_ALLOCATION_TYPE_PINNED, CU_MEM_LOCATION_TYPE_DEVICE,
         CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
         CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
  return 0;
}
""")
    exe = tmp_path / "probe"
    subprocess.run(["cc", f"-I{CUDA_INCLUDE}", str(probe), "-o", str(exe)], check=True)
    sizes, constants = subprocess.run([str(exe)], capture_output=True, text=True,
                                      check=True).stdout.splitlines()
    assert [int(x) for x in sizes.split()] == [
        ctypes.sizeof(_AllocationProp), _AllocationProp.location.offset,
        _AllocationProp.allocFlags.offset, ctypes.sizeof(_AccessDesc), _AccessDesc.flags.offset,
        ctypes.sizeof(_IpcHandle)]
    from cachemgr import device_pool as d
    assert [int(x) for x in constants.split()] == [
        d.CU_MEM_ALLOCATION_TYPE_PINNED, d.CU_MEM_LOCATION_TYPE_DEVICE,
        d.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, d.CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        d.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS]
