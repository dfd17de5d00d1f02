"""kv_mem_pool without a GPU: the allocator library pip built into the package, loaded with
ctypes and driven on a fake region (a host buffer's addresses; it never touches them); the
connector's get_mem_pool_context on the real daemon's host pools (None, or the error naming the
key); the arena's sizing; and the arena opened against a fake CUDA pool and a fake torch, which
checks what it asks the daemon for and what it hands PyTorch. scripts/gpu-check.sh runs the
allocator under the real PyTorch on a GPU (tests/gpu/kv_mem_pool_check.py)."""

import contextlib
import dataclasses
import os
import sys
import time
import types

import numpy as np
import pytest

import cachemgr
from cachemgr import kv_mem_pool
from cachemgr.device_pool import DevicePool
from cachemgr.integrations import vllm as connector_module
from cachemgr.integrations import vllm_mem_pool

MiB = 1 << 20


@pytest.fixture
def library():
    lib = kv_mem_pool.KvMemPoolLibrary()  # the packaged one: pip built it
    yield lib
    assert lib.reset(), "a test left allocations live"


def fake_region(nbytes):
    """A 256-aligned address range of nbytes (backed by a host buffer kept alive by the caller,
    though the allocator never dereferences it)."""
    buffer = np.zeros(nbytes + 256, np.uint8)
    base = buffer.ctypes.data + (-buffer.ctypes.data) % 256
    return buffer, base


def test_the_package_ships_the_library():
    path = kv_mem_pool.packaged_library_path()
    assert path is not None and os.path.dirname(path) == os.path.dirname(kv_mem_pool.__file__)


def test_the_library_carves_a_fake_region(library):
    buffer, base = fake_region(MiB)
    library.configure(5, base, MiB)
    s = library.stats()
    assert (s.device, s.base, s.region_bytes, s.bytes_in_use) == (5, base, MiB, 0)
    # vLLM's way: raw int8 buffers of a few sizes; each aligned, inside, disjoint.
    sizes = [1, 4096, 100_000, 3 * 65536 + 7]
    ptrs = [library.malloc(n, 5) for n in sizes]
    assert all(p % 256 == 0 and library.stats().contains(p, n) for p, n in zip(ptrs, sizes))
    spans = sorted(zip(ptrs, sizes))
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))
    assert library.stats().bytes_in_use == sum(-(-n // 256) * 256 for n in sizes)
    # Exhausted: 0 (PyTorch raises OutOfMemoryError), never memory from elsewhere; another
    # device gets nothing either.
    assert library.malloc(MiB, 5) == 0
    assert library.malloc(256, 0) == 0
    assert library.stats().failed_allocations == 2
    with pytest.raises(RuntimeError, match="live allocations"):
        library.configure(5, base, MiB)
    assert not library.reset()
    # Foreign and double frees are counted and change nothing.
    library.free(buffer.ctypes.data + 8)
    library.free(ptrs[0])
    library.free(ptrs[0])
    assert library.stats().rejected_frees == 2
    for p in ptrs[1:]:
        library.free(p)
    s = library.stats()
    assert s.bytes_in_use == 0 and s.live_allocations == 0 and s.largest_free_bytes == MiB
    # Coalesced: the whole region fits again.
    whole = library.malloc(MiB, 5)
    assert whole == base
    library.free(whole)
    del buffer


def test_configure_refuses_a_bad_region(library):
    buffer, base = fake_region(MiB)
    with pytest.raises(ValueError, match="aligned"):
        library.configure(0, base + 8, MiB)
    with pytest.raises(ValueError):
        library.configure(-1, base, MiB)
    assert library.stats().region_bytes == 0
    del buffer


def make(daemon, **extra):
    config = dict(socket=daemon.socket, num_layers=2, num_q_heads=4, num_kv_heads=2,
                  head_dim=16, block_size=4, dtype="fp16", model_name="mini-mem-pool",
                  num_blocks=64, layout="split_last_dim", **extra)
    return connector_module.CacheManagerConnector(role=connector_module.KVConnectorRole.WORKER,
                                                  config=config)


def test_host_pools_get_vllms_own_allocator(daemon):
    worker = make(daemon)
    assert worker.session.backend == "BACKEND_HOST"
    assert worker.get_mem_pool_context() is None
    worker.shutdown()


def test_kv_mem_pool_on_a_host_pool_is_refused_at_start(daemon):
    with pytest.raises(ValueError, match=r"kv_mem_pool: true needs a CUDA pool.*--backend=cuda"):
        make(daemon, kv_mem_pool=True)
    # The worker detached on its way out.
    assert cachemgr.stats(daemon.socket).clients == []
    with pytest.raises(ValueError, match="kv_mem_pool must be true or false"):
        make(daemon, kv_mem_pool="yes")
    # false (also as a string) is vLLM's own allocator.
    worker = make(daemon, kv_mem_pool="false")
    assert worker.get_mem_pool_context() is None
    worker.shutdown()


def test_kv_mem_pool_needs_the_daemon_at_start(daemon_factory):
    d = daemon_factory()
    d.kill()
    with pytest.raises(RuntimeError, match="kv_mem_pool: true .* cachemgrd must answer"):
        make(d, kv_mem_pool=True)
    make(d).shutdown()  # without kv_mem_pool vLLM starts and the sidecar comes later


def test_kv_mem_pool_refuses_vllms_sleep_mode():
    vllm_config = types.SimpleNamespace(model_config=types.SimpleNamespace(
        enable_sleep_mode=True))
    with pytest.raises(ValueError, match="kv_mem_pool: true .* enable_sleep_mode"):
        vllm_mem_pool.check_at_start(None, None, vllm_config)


def kv_cache_config(size, tensors=2):
    """vLLM 0.32's: every KVCacheTensor names the one backing buffer's size."""
    return types.SimpleNamespace(kv_cache_tensors=[
        types.SimpleNamespace(size=size, layers=[f"model.layers.{i}.self_attn.attn"])
        for i in range(tensors)])


def test_arena_sizing():
    assert vllm_mem_pool.kv_cache_bytes(kv_cache_config(123_456_789)) == 123_456_789
    with pytest.raises(ValueError, match="different backing sizes"):
        vllm_mem_pool.kv_cache_bytes(types.SimpleNamespace(kv_cache_tensors=[
            types.SimpleNamespace(size=1), types.SimpleNamespace(size=2)]))
    with pytest.raises(ValueError, match="no device KV cache tensor"):
        vllm_mem_pool.kv_cache_bytes(types.SimpleNamespace(kv_cache_tensors=[]))
    # PyTorch's 2 MiB segment rounding, plus one segment.
    assert vllm_mem_pool.region_bytes_needed(1) == 4 * MiB
    assert vllm_mem_pool.region_bytes_needed(2 * MiB) == 4 * MiB
    assert vllm_mem_pool.region_bytes_needed(2 * MiB + 1) == 6 * MiB
    model = cachemgr.ModelSpec(name="x" * 128, num_layers=32, num_q_heads=32, num_kv_heads=8,
                               head_dim=128, dtype="bf16", block_size=16)
    for nbytes in (1, 4 * MiB, 37 << 30):
        blocks = vllm_mem_pool.arena_num_blocks(model, nbytes)
        pool_bytes = 32 * 2 * blocks * 16 * 8 * 128 * 2
        assert pool_bytes >= nbytes and (blocks == 1 or pool_bytes - nbytes < 32 * 65536)
    a, b = vllm_mem_pool.arena_model(model), vllm_mem_pool.arena_model(model)
    assert a.name != b.name and len(a.name) == 128 and a.name.startswith("vllm-kv-cache.")
    assert dataclasses.replace(a, name=model.name) == model


class FakeDriver:
    """The CUDA driver calls DevicePool makes for a VMM pool, mapping at a fake region."""

    def __init__(self, base):
        self.base = base
        self.unmapped = []

    def device_ordinal(self, uuid):
        return 0

    def map_vmm(self, ordinal, fd, size):
        return self.base

    def unmap_vmm(self, ptr):
        self.unmapped.append(ptr)


def fake_torch(events):
    """The parts of torch the arena uses, recording what it is given."""
    torch = types.ModuleType("torch")
    cuda = types.ModuleType("torch.cuda")
    memory = types.ModuleType("torch.cuda.memory")

    class OutOfMemoryError(RuntimeError):
        pass

    class CUDAPluggableAllocator:
        def __init__(self, path, alloc_fn, free_fn):
            events.append(("allocator", path, alloc_fn, free_fn))

        def allocator(self):
            return "raw-allocator"

    class MemPool:
        def __init__(self, allocator):
            events.append(("mem_pool", allocator))

    @contextlib.contextmanager
    def use_mem_pool(pool):
        events.append(("enter", pool))
        yield
        events.append(("exit", pool))

    torch.OutOfMemoryError = OutOfMemoryError
    memory.CUDAPluggableAllocator = CUDAPluggableAllocator
    cuda.memory = memory
    cuda.MemPool = MemPool
    cuda.use_mem_pool = use_mem_pool
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda device=None: events.append(("synchronize", device))
    torch.cuda = cuda
    return {"torch": torch, "torch.cuda": cuda, "torch.cuda.memory": memory}


def test_the_arena_lends_vllm_a_region_of_its_own(monkeypatch, library):
    kv_bytes = 5 * MiB + 3
    need = vllm_mem_pool.region_bytes_needed(kv_bytes)
    buffer, base = fake_region(need + MiB)
    driver = FakeDriver(base)
    attached = {}

    class FakeSession:  # what Session.attach returns for a VMM pool of the daemon
        backend = "BACKEND_CUDA"
        pool_id = "pool-7"

        def __init__(self, model, num_blocks):
            fd = os.open("/dev/null", os.O_RDONLY)
            self.pool = DevicePool(model, num_blocks, "GPU-fake", "vmm_fd",
                                   [(fd, need + MiB, b"")], [], driver=driver,
                                   wrap=lambda a: a)
            self.detached = False

        def detach(self):
            self.detached = True
            self.pool.close()

    def attach(target, client_name, model, num_blocks=0, **kwargs):
        attached.update(target=target, client_name=client_name, model=model,
                        num_blocks=num_blocks, **kwargs)
        attached["session"] = FakeSession(model, num_blocks)
        return attached["session"]

    events = []
    for name, module in fake_torch(events).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(vllm_mem_pool.Session, "attach", attach)
    model = cachemgr.ModelSpec(name="llama", num_layers=2, num_q_heads=4, num_kv_heads=2,
                               head_dim=16, dtype="fp16", block_size=4)
    arena = vllm_mem_pool.KvCacheArena.open({"socket": "/s", "client_name": "w0"}, model,
                                            kv_cache_config(kv_bytes))
    # A pool of the model's shape under a name of its own, large enough, kept mapped on a
    # loss, never re-attached.
    assert attached["target"] == "/s" and attached["client_name"] == "w0-kv-cache"
    assert attached["model"].name.endswith(".llama") and attached["model"].num_layers == 2
    assert attached["num_blocks"] * 2 * 2 * 4 * 2 * 16 * 2 >= need
    assert attached["revoke_on_loss"] is False and attached["auto_reattach"] is False
    # The allocator got the region; PyTorch gets the packaged library by its two functions.
    s = library.stats()
    assert (s.device, s.base, s.region_bytes) == (0, base, need + MiB)
    assert events == [("allocator", library.path, "cachemgr_kv_malloc", "cachemgr_kv_free"),
                      ("mem_pool", "raw-allocator")]
    with arena.context():
        kv = library.malloc(kv_bytes, 0)  # what PyTorch does inside the context
    assert [e[0] for e in events[2:]] == ["enter", "exit"]
    assert library.stats().contains(kv, kv_bytes)
    library.free(kv)
    arena.close()
    assert attached["session"].detached and driver.unmapped == [base]
    assert library.stats().region_bytes == 0
    arena.close()  # idempotent
    del buffer


def test_a_session_kept_on_loss_keeps_its_mapping(daemon_factory):
    d = daemon_factory("--heartbeat_interval_ms=100", "--lease_timeout_ms=1000")
    model = cachemgr.ModelSpec(name="kept", num_layers=1, num_q_heads=2, num_kv_heads=2,
                               head_dim=8, block_size=4)
    events = []
    s = cachemgr.Session.attach(d.socket, "arena", model, num_blocks=4, auto_reattach=False,
                                on_event=events.append, revoke_on_loss=False)
    view = s.pool.layer(0)
    view[...] = 7
    d.kill()
    deadline = time.monotonic() + 10
    while s.lease_ok and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not s.lease_ok and [e.kind for e in events] == ["lost"]
    assert s.mapping_revoked_at is None
    assert (view == 7).all()  # still the pool's memory (a revoked mapping reads zeros)
    s.detach()
