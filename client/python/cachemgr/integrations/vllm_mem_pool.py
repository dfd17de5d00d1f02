"""kv_mem_pool: vLLM's KV cache allocated in a CUDA pool that cachemgrd lends (the connector's
get_mem_pool_context; docs/VLLM.md, "KV cache in the sidecar's memory").

vLLM's GPU worker enters the connector's get_mem_pool_context() around the allocation of its KV
cache (vLLM 0.32: one int8 backing buffer of KVCacheTensor.size bytes, which every layer's cache
views). With kv_mem_pool on, the worker attaches a second session of its own, the *arena*: a
pool of the model's shape under a name no other client uses, with enough blocks that its single
device region holds that buffer. Nothing is ever allocated in the arena through the daemon; the
region's bytes go to the allocator of client/kv_mem_pool (cachemgr.kv_mem_pool), and the context
is torch.cuda.use_mem_pool over a MemPool of that allocator, so the buffer vLLM allocates lies
in the daemon's memory, charged to its --memory_budget and visible in its stats as that pool.

What the daemon sees there is bytes, not blocks: vLLM's buffer has vLLM's layout (layers,
blocks and K/V as vLLM's attention backend packs them), not the arena pool's, and the daemon
holds no sequence in the arena. So it cannot compress, store or serve vLLM's blocks in place;
the prefix store and the per-request path copy between vLLM's blocks and the worker's own
session as without kv_mem_pool.

Lifetime: the arena session keeps its mapping if its lease is lost (Session revoke_on_loss
False): vLLM's tensors point into it for the life of the process. It needs --cuda_share=vmm_fd
(a VMM mapping holds its memory even after the daemon releases it); after a loss the daemon no
longer counts that memory in its budget, which is logged. shutdown() detaches the arena.
"""

import contextlib
import dataclasses
import logging
import os
import secrets
from typing import Any, Dict, Optional

from ..errors import CacheManagerError
from ..kv_mem_pool import KvMemPoolLibrary
from ..session import Session, SessionEvent
from ..types import ModelSpec

_log = logging.getLogger("cachemgr.vllm")

KEY = "kv_mem_pool"
LIBRARY_KEY = "mem_pool_library"
# PyTorch's caching allocator asks a pool's allocator for whole segments: a large request is
# rounded up to a multiple of 2 MiB. The arena holds that plus one more 2 MiB segment for a
# small allocation made inside the context.
SEGMENT_BYTES = 2 << 20
_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
_MAX_NAME = 128  # cachemgrd's model name limit


def enabled(config: Dict[str, Any]) -> bool:
    """kv_mem_pool from kv_connector_extra_config: true/false (JSON) or "true"/"false"."""
    value = config.get(KEY, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"kv_connector_extra_config {KEY} must be true or false (got {value!r})")


def check_at_start(session: Optional[Session], last_error: Optional[Exception],
                   vllm_config=None) -> None:
    """The worker's checks when kv_mem_pool is on, before vLLM asks for the context: vLLM's own
    KV allocators are off, the daemon is up and lends CUDA pools through VMM handles. Raises
    ValueError (RuntimeError while the daemon is unreachable) naming the key."""
    model_config = getattr(vllm_config, "model_config", None)
    for flag in ("enable_sleep_mode", "enable_cumem_allocator"):
        if getattr(model_config, flag, False):
            raise ValueError(f"kv_connector_extra_config {KEY}: true allocates vLLM's KV cache "
                             f"in cachemgrd's memory, which vLLM's {flag} cannot manage; turn "
                             f"one of them off")
    if session is None:
        raise RuntimeError(f"kv_connector_extra_config {KEY}: true puts vLLM's KV cache in "
                           f"cachemgrd's memory, so cachemgrd must answer when vLLM starts "
                           f"({last_error or 'no session'})")
    pool = session.pool
    if not getattr(pool, "on_device", False):
        raise ValueError(f"kv_connector_extra_config {KEY}: true needs a CUDA pool "
                         f"(cachemgrd --backend=cuda), but cachemgrd serves this model's pool "
                         f"from {session.backend}; start cachemgrd with --backend=cuda or drop "
                         f"{KEY}")
    if pool.share_method != "vmm_fd":
        raise ValueError(f"kv_connector_extra_config {KEY}: true needs cachemgrd "
                         f"--cuda_share=vmm_fd (the worker's VMM mapping keeps vLLM's KV cache "
                         f"alive whatever the daemon does); this daemon shares by "
                         f"{pool.share_method}")


def kv_cache_bytes(kv_cache_config) -> int:
    """Bytes of vLLM 0.32's KV cache allocation: every KVCacheTensor names the size of the one
    backing buffer (vllm/v1/worker/utils.py allocate_kv_cache)."""
    tensors = list(getattr(kv_cache_config, "kv_cache_tensors", None) or [])
    sizes = {int(t.size) for t in tensors if not getattr(t, "host_resident", False)}
    if not sizes:
        raise ValueError(f"{KEY}: vLLM's kv_cache_config names no device KV cache tensor")
    if len(sizes) != 1:
        raise ValueError(f"{KEY}: vLLM's KV cache tensors name different backing sizes "
                         f"({sorted(sizes)}); this connector knows vLLM 0.32's single buffer")
    return sizes.pop()


def region_bytes_needed(kv_bytes: int) -> int:
    """The region for a KV cache of kv_bytes: PyTorch's segment rounding plus one segment."""
    return -(-kv_bytes // SEGMENT_BYTES) * SEGMENT_BYTES + SEGMENT_BYTES


def arena_model(model: ModelSpec) -> ModelSpec:
    """The model's shape under a pool name of this process alone (pid and 32 random bits), so
    no other client, nor this engine restarted, ever shares the arena."""
    prefix = f"vllm-kv-cache.{os.getpid()}.{secrets.token_hex(4)}."
    return dataclasses.replace(model, name=(prefix + model.name)[:_MAX_NAME])


def arena_num_blocks(model: ModelSpec, nbytes: int) -> int:
    """Blocks per layer that make a pool of `model` at least `nbytes` in all (the daemon lays
    the layers out one after another in one region, each padded, so it may be larger)."""
    per_block = (model.num_layers * 2 * model.block_size * model.num_kv_heads * model.head_dim *
                 _ITEMSIZE[model.dtype])
    blocks = max(1, -(-nbytes // per_block))
    if blocks >= 1 << 32:
        raise ValueError(f"{KEY}: a KV cache of {nbytes} bytes needs {blocks} blocks per layer, "
                         f"more than a pool can have")
    return blocks


class KvCacheArena:
    """The arena session, its region in the allocator and the MemPool over it. open() makes
    one; context() is what get_mem_pool_context returns; close() detaches."""

    def __init__(self, session: Session, library: KvMemPoolLibrary, mem_pool, allocator,
                 device: int, kv_bytes: int):
        self.session = session
        self.library = library
        self.device = device
        self.kv_bytes = kv_bytes
        self._mem_pool = mem_pool
        self._allocator = allocator  # the MemPool calls into it: kept alive with it

    @classmethod
    def open(cls, config: Dict[str, Any], model: ModelSpec, kv_cache_config) -> "KvCacheArena":
        import torch

        if kv_cache_config is None:
            raise ValueError(f"kv_connector_extra_config {KEY}: true needs vLLM's "
                             f"kv_cache_config (vLLM passes it to the connector's __init__)")
        kv_bytes = kv_cache_bytes(kv_cache_config)
        need = region_bytes_needed(kv_bytes)
        try:
            library = KvMemPoolLibrary(config.get(LIBRARY_KEY))
        except OSError as e:  # FileNotFoundError too
            raise RuntimeError(f"kv_connector_extra_config {KEY}: true needs the allocator "
                               f"library: {e} ({LIBRARY_KEY} names one)") from e
        spec = arena_model(model)
        try:
            session = Session.attach(config["socket"],
                                     f"{config.get('client_name', 'vllm-worker')}-kv-cache", spec,
                                     num_blocks=arena_num_blocks(spec, need),
                                     input_buffer_bytes=4096, auto_reattach=False,
                                     on_event=_arena_event, revoke_on_loss=False)
        except CacheManagerError as e:
            raise RuntimeError(f"{KEY}: cachemgrd could not lend {need} bytes for vLLM's KV "
                               f"cache ({kv_bytes} bytes): {e} (raise cachemgrd's "
                               f"--memory_budget, or lower vLLM's gpu_memory_utilization)") from e
        try:
            check_at_start(session, None)
            device = torch.cuda.current_device()
            if session.pool.ordinal != device:
                raise ValueError(f"{KEY}: cachemgrd's pool is on CUDA device "
                                 f"{session.pool.ordinal} ({session.pool.device}) of this "
                                 f"process, vLLM's worker on device {device}: run one cachemgrd "
                                 f"per GPU and point each worker at its GPU's daemon")
            regions = session.pool.regions
            if len(regions) != 1 or regions[0][1] < need:
                raise RuntimeError(f"{KEY}: cachemgrd lent regions {regions}, not one region of "
                                   f"at least {need} bytes")
            base, nbytes = regions[0]
            library.configure(device, base, nbytes)
            allocator = library.torch_allocator()
            mem_pool = torch.cuda.MemPool(allocator.allocator())
        except BaseException:
            session.detach()
            library.reset()
            raise
        _log.info("cachemgr %s: vLLM's KV cache (%d bytes) goes into cachemgrd pool %s, a "
                  "region of %d bytes at %#x on %s", KEY, kv_bytes, session.pool_id, nbytes, base,
                  session.pool.device)
        return cls(session, library, mem_pool, allocator, device, kv_bytes)

    @contextlib.contextmanager
    def context(self):
        """torch.cuda.use_mem_pool over the arena; says what went in when it ends, or why an
        allocation did not fit."""
        import torch

        try:
            with torch.cuda.use_mem_pool(self._mem_pool):
                yield
        except torch.OutOfMemoryError:
            _log.error("cachemgr %s: vLLM's KV cache did not fit the region cachemgrd lent "
                       "(%s); nothing was allocated elsewhere", KEY, self.library.stats())
            raise
        stats = self.library.stats()
        _log.info("cachemgr %s: %d bytes in %d allocations now live in cachemgrd's region (%d "
                  "bytes)", KEY, stats.bytes_in_use, stats.live_allocations, stats.region_bytes)

    def close(self) -> None:
        """Detaches the arena (the daemon frees it). vLLM calls the connector's shutdown() as
        the worker exits, after its last forward; its KV tensors must not be used after this."""
        if self.session is None:
            return
        try:
            import torch
            torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001 - best effort: the device may be gone already
            pass
        self.session.detach()
        self.session = None
        self._mem_pool = None
        self.library.reset()  # refused (kept as it is) while vLLM's tensors are alive


def _arena_event(event: SessionEvent) -> None:
    if event.kind == "lost":
        _log.error("cachemgr %s: the session that holds vLLM's KV cache memory was lost (%s). "
                   "vLLM keeps its KV cache (this process's mapping holds the memory), but "
                   "cachemgrd no longer counts it in --memory_budget; restart vLLM to have it "
                   "counted again", KEY, event.error)
