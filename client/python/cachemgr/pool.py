"""Zero-copy views of a host pool (memfd shared memory) in vLLM's layouts.

Per layer the daemon lays K and V out as vLLM's attention backends expect:
  flash_attn:  [2, num_blocks, block_size, num_kv_heads, head_dim]   (K plane, then V plane)
  flashinfer:  [num_blocks, 2, block_size, num_kv_heads, head_dim]
A slot is block * block_size + offset (vLLM's slot mapping). bf16 has no numpy type: its views
are uint16 (the raw bits; `bf16_to_float32` converts)."""

import mmap
import os
from typing import List, Optional, Sequence

import grpc
import numpy as np

from . import lease
from .errors import CacheManagerError
from .types import ModelSpec

_NUMPY_DTYPES = {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32}
_ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux; Python >= 3.10
# mmap, numpy and the daemon address memory with signed 64-bit sizes.
_MAX_BYTES = (1 << 63) - 1


def check_layer_places(model: ModelSpec, num_blocks: int, region_bytes: Sequence[int],
                       layer_places: Sequence[tuple]) -> None:
    """Checks a pool descriptor before anything is mapped: one place per layer, each (region,
    offset, bytes) inside its region and exactly the layer size the model implies. Raises
    CacheManagerError(DATA_LOSS) naming the layer otherwise (a daemon bug or a forged reply; a
    layer described larger than its memory would let a write land outside the pool)."""
    def bad(what: str) -> CacheManagerError:
        return CacheManagerError(grpc.StatusCode.DATA_LOSS, f"daemon sent a pool {what}")

    want = 2 * num_blocks * model.block_size * model.num_kv_heads * model.head_dim * \
        _ELEM_BYTES[model.dtype]
    if want == 0 or want > _MAX_BYTES:
        raise bad(f"of {num_blocks} blocks whose layer size ({want} bytes) is not addressable")
    if len(layer_places) != model.num_layers:
        raise bad(f"with {len(layer_places)} layers for a model of {model.num_layers}")
    for layer, (region, offset, nbytes) in enumerate(layer_places):
        if not 0 <= region < len(region_bytes):
            raise bad(f"layer {layer} in region {region} of {len(region_bytes)}")
        if nbytes != want:
            raise bad(f"layer {layer} of {nbytes} bytes; the model implies {want}")
        if offset < 0 or offset + nbytes > region_bytes[region]:
            raise bad(f"layer {layer} at [{offset}, +{nbytes}) beyond its region of "
                      f"{region_bytes[region]} bytes")


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even, as the daemon's kernels do."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(values)
    out = rounded.astype(np.uint16)
    out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


class HostPool:
    """The pool of one model, mapped into this process. Views stay valid while the pool (and
    the Session that owns it) lives; after revoke() they reach private memory, not the pool."""

    on_device = False  # host memory (DevicePool: True)

    def __init__(self, model: ModelSpec, num_blocks: int, region_fds: Sequence[int],
                 region_bytes: Sequence[int], layer_places: Sequence[tuple]):
        self.model = model
        self.num_blocks = num_blocks
        self._maps: List[mmap.mmap] = []
        self._ranges: List[tuple] = []  # (address, bytes) of each mapping
        self.revoked = False
        try:
            for fd, size in zip(region_fds, region_bytes):
                # Populated now (the daemon committed the pages): a first write into an
                # unpopulated mapping runs at a fifteenth of memory speed, one fault per page.
                self._maps.append(mmap.mmap(fd, size, mmap.MAP_SHARED | _MAP_POPULATE,
                                            mmap.PROT_READ | mmap.PROT_WRITE))
                self._ranges.append((lease.buffer_address(self._maps[-1]), size))
        finally:
            for fd in region_fds:
                os.close(fd)
        self.dtype = _NUMPY_DTYPES[model.dtype]
        shape = ((2, num_blocks) if model.layout == "flash_attn" else (num_blocks, 2)) + (
            model.block_size, model.num_kv_heads, model.head_dim)
        self._layers = []
        for region, offset, nbytes in layer_places:
            array = np.frombuffer(self._maps[region], dtype=self.dtype,
                                  count=nbytes // np.dtype(self.dtype).itemsize, offset=offset)
            self._layers.append(array.reshape(shape))

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def layer(self, layer: int) -> np.ndarray:
        """The whole layer tensor in the negotiated layout (a writable view)."""
        return self._layers[layer]

    def key_cache(self, layer: int) -> np.ndarray:
        """[num_blocks, block_size, num_kv_heads, head_dim] view of the K plane."""
        t = self._layers[layer]
        return t[0] if self.model.layout == "flash_attn" else t[:, 0]

    def value_cache(self, layer: int) -> np.ndarray:
        t = self._layers[layer]
        return t[1] if self.model.layout == "flash_attn" else t[:, 1]

    def whole_blocks(self, slot_mapping) -> Optional[np.ndarray]:
        """The pool blocks a slot mapping fills whole, in order (each run of block_size slots
        one block's rows from its first), or None if it does not."""
        slots = np.asarray(slot_mapping, dtype=np.int64)
        bs = self.model.block_size
        if not slots.size or slots.size % bs:
            return None
        runs = slots.reshape(-1, bs)
        if (runs[:, 0] >= 0).all() and (runs[:, 0] % bs == 0).all() and \
                (runs - runs[:, :1] == np.arange(bs)).all():
            return runs[:, 0] // bs
        return None

    def write(self, layer: int, slot_mapping: np.ndarray, keys: np.ndarray,
              values: np.ndarray) -> None:
        """vLLM's reshape_and_cache: token t's K/V rows ([tokens, num_kv_heads, head_dim], in the
        pool's dtype) go to slot_mapping[t]; -1 is padding."""
        blocks = self.whole_blocks(slot_mapping)
        if blocks is not None:  # one index per block instead of one per row
            shape = (len(blocks), self.model.block_size) + keys.shape[1:]
            self.key_cache(layer)[blocks] = keys.reshape(shape)
            self.value_cache(layer)[blocks] = values.reshape(shape)
            return
        slots = np.asarray(slot_mapping, dtype=np.int64)
        keep = slots >= 0
        blocks, offsets = np.divmod(slots[keep], self.model.block_size)
        self.key_cache(layer)[blocks, offsets] = keys[keep]
        self.value_cache(layer)[blocks, offsets] = values[keep]

    def read(self, layer: int, block_ids: Sequence[int], num_tokens: int):
        """Copies of the first `num_tokens` rows of a block table: (keys, values), each
        [num_tokens, num_kv_heads, head_dim]."""
        rows = np.arange(num_tokens)
        table = np.asarray(block_ids, dtype=np.int64)
        blocks, offsets = table[rows // self.model.block_size], rows % self.model.block_size
        return self.key_cache(layer)[blocks, offsets].copy(), \
            self.value_cache(layer)[blocks, offsets].copy()

    def revoke(self) -> None:
        """Cuts the views off the pool in place (mmap MAP_FIXED of private anonymous memory over
        each mapping): existing arrays stay valid, but what they read and write is private to
        this process. Called when the session lost its lease. Idempotent; OSError if a mapping
        could be neither replaced nor made inaccessible."""
        if self.revoked or not self._maps:
            return
        for address, size in self._ranges:
            lease.revoke_host_mapping(address, size)
        self.revoked = True

    def close(self) -> None:
        self._layers = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # a view still exported by the caller keeps the mapping alive
        self._maps = []
