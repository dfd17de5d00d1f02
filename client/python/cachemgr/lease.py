"""The client's side of its lease: the clock, the local deadline, and revoking a mapping.

The daemon judges a lease by when a call arrived (never earlier than when the client sent it)
plus the lease timeout. The client moves its local deadline to `send time + granted - margin`
after each call that renewed the lease, so the local deadline always passes first.

Revoking a host mapping replaces it in place with private anonymous memory (mmap MAP_FIXED):
numpy arrays over it stay valid objects, but stores through them land in private memory and can
never reach the pool again."""

import ctypes
import ctypes.util
import time
from datetime import datetime, timezone

# Linux mmap constants (the mmap module does not export MAP_FIXED).
_PROT_NONE, _PROT_READ, _PROT_WRITE = 0, 1, 2
_MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x02, 0x10, 0x20, 0x4000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.mprotect.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


def boot_ns() -> int:
    """CLOCK_BOOTTIME: monotonic, and counting while the machine sleeps or the process is
    stopped, as the daemon's lease does."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def margin_ns(lease_ms: int) -> int:
    """A tenth of the lease, between 1 ms and 1 s."""
    return min(max(lease_ms * 100_000, 1_000_000), 1_000_000_000)


def local_deadline(sent_ns: int, granted_ms: int, lease_ms: int) -> int:
    return sent_ns + granted_ms * 1_000_000 - margin_ns(lease_ms)


def format_boot_time(ns: int) -> str:
    """A CLOCK_BOOTTIME instant as UTC wall-clock time, for messages."""
    wall = time.time() - (boot_ns() - ns) / 1e9
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def buffer_address(buffer) -> int:
    """The address of a writable buffer (an mmap.mmap), without keeping it exported."""
    view = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def revoke_host_mapping(address: int, size: int) -> None:
    """Replaces [address, address + size) with private anonymous memory in one step; if the
    kernel refuses, makes it inaccessible instead (stale accesses fault rather than reach the
    pool). OSError if both fail."""
    result = _libc.mmap(address, size, _PROT_READ | _PROT_WRITE,
                        _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE, -1, 0)
    if result is not None and result != _MAP_FAILED:
        return
    err = ctypes.get_errno()
    if _libc.mprotect(address, size, _PROT_NONE) == 0:
        return
    raise OSError(err, f"replacing the pool mapping at {address:#x} with private memory")
