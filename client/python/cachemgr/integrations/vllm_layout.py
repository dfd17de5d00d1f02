"""Where a vLLM attention backend keeps the K and V rows of one layer's paged KV cache, and the
proof of it: every layout is checked against the backend's own cache-write op before the
connector moves a byte (verify_layout), and an unknown backend or a layout that does not match
is refused with a message naming both.

vLLM 0.32 hands each layer's cache as a tensor of logical shape [num_blocks, num_kv_heads,
block_size, 2 * head_dim] (its strides may order the axes otherwise in memory: KVCacheLayout),
and each backend packs K and V into it its own way:

  split_last_dim   K = [..., :head_dim], V = [..., head_dim:] (FlashAttention, FlashInfer's
                   and Triton's NHD/HND paths: `kv_cache.transpose(1, 2).split(head_dim, -1)`);
  head_halves      each head's block is K then V, block_size * head_dim elements each (the CPU
                   backend: `kv_cache.view(num_blocks, heads, 2 * block_size, head_dim)
                   .chunk(2, dim=2)`), rows of head_dim;
  head_halves_k_transposed
                   the same with K stored [head_dim, block_size] (the CPU backend's kernels
                   for the "vec" ISA, as verify_layout found: its cache-write op transposes K).

Layout.views() returns K and V as [num_blocks, num_kv_heads, block_size, head_dim] views (no
copy) of either a torch tensor or a numpy array; gather/scatter move the rows of given
(block, offset) slots as [tokens, num_kv_heads, head_dim].
"""

import dataclasses
from typing import Any, Callable, Dict, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    _views: Callable[[Any, int], Tuple[Any, Any]]

    def views(self, kv_layer, head_dim: int):
        """(K, V), each [num_blocks, num_kv_heads, block_size, head_dim], views of kv_layer."""
        return self._views(kv_layer, head_dim)

    def gather(self, kv_layer, head_dim: int, blocks, offsets):
        """K and V rows of the slots (blocks[i], offsets[i]): two [n, kv_heads, head_dim]."""
        k, v = self.views(kv_layer, head_dim)
        return k[blocks, :, offsets, :], v[blocks, :, offsets, :]

    def gather_blocks(self, kv_layer, head_dim: int, block_ids):
        """K and V rows of whole blocks, in order: two [len(block_ids) * block_size, kv_heads,
        head_dim]; the same rows as gather() of every slot of those blocks, with one index per
        block instead of one per row."""
        k, v = self.views(kv_layer, head_dim)
        out = []
        for plane in (k[block_ids], v[block_ids]):  # [n, heads, block_size, head_dim]
            n, heads, block_size, dim = plane.shape
            rows = (plane.transpose(1, 2) if hasattr(plane, "untyped_storage")
                    else plane.transpose(0, 2, 1, 3))
            out.append(rows.reshape(n * block_size, heads, dim))
        return out[0], out[1]

    def copy_blocks(self, kv_layer, head_dim: int, block_ids, k_out, v_out) -> None:
        """Copies whole blocks of a torch kv_layer, in order, into k_out and v_out (torch
        tensors of [len(block_ids) * block_size, kv_heads, head_dim] rows each, e.g. views of
        the sidecar's pool): the rows gather_blocks() returns, in one strided copy per block
        and plane instead of a gather and a second copy."""
        k, v = self.views(kv_layer, head_dim)
        _, heads, block_size, dim = k.shape
        k_out = k_out.view(len(block_ids), block_size, heads, dim)
        v_out = v_out.view(len(block_ids), block_size, heads, dim)
        for i, block in enumerate(block_ids):
            k_out[i].copy_(k[block].transpose(0, 1))
            v_out[i].copy_(v[block].transpose(0, 1))

    def scatter(self, kv_layer, head_dim: int, blocks, offsets, k_rows, v_rows) -> None:
        """Writes [n, kv_heads, head_dim] rows into the slots (blocks[i], offsets[i])."""
        k, v = self.views(kv_layer, head_dim)
        k[blocks, :, offsets, :] = k_rows
        v[blocks, :, offsets, :] = v_rows


def _split_last_dim(kv, head_dim):
    if kv.shape[-1] != 2 * head_dim:
        raise ValueError(f"last dimension {kv.shape[-1]} is not 2 * head_dim ({2 * head_dim})")
    return kv[..., :head_dim], kv[..., head_dim:]


def _dense_view(kv, shape):
    """kv viewed as `shape` without a copy (torch's view() raises where reshape() would copy)."""
    if hasattr(kv, "untyped_storage"):
        return kv.view(shape)
    rows = kv.reshape(shape)
    if not np.may_share_memory(rows, kv):
        raise ValueError("the layout needs each block's [heads, rows, dim] dense")
    return rows


def _halves(kv, head_dim, k_transposed):
    num_blocks, heads, block_size, content = kv.shape
    if content != 2 * head_dim:
        raise ValueError(f"last dimension {content} is not 2 * head_dim ({2 * head_dim})")
    halves = _dense_view(kv, (num_blocks, heads, 2, block_size * head_dim))
    v = _dense_view(halves[:, :, 1, :], (num_blocks, heads, block_size, head_dim))
    if not k_transposed:
        return _dense_view(halves[:, :, 0, :], (num_blocks, heads, block_size, head_dim)), v
    k = _dense_view(halves[:, :, 0, :], (num_blocks, heads, head_dim, block_size))
    return k.transpose(2, 3) if hasattr(k, "untyped_storage") else k.transpose(0, 1, 3, 2), v


LAYOUTS: Dict[str, Layout] = {
    "split_last_dim": Layout("split_last_dim", _split_last_dim),
    "head_halves": Layout("head_halves", lambda kv, d: _halves(kv, d, False)),
    "head_halves_k_transposed": Layout("head_halves_k_transposed",
                                       lambda kv, d: _halves(kv, d, True)),
}

# vLLM 0.32's attention backends (AttentionBackend.get_name(); the CPU backend per kernel ISA,
# the layer's `isa`) and the layout of each. Only layouts seen to match are listed: AMX, NEON
# and the other CPU ISAs are refused until verified on such a machine.
BACKEND_LAYOUTS: Dict[str, str] = {
    "CPU_ATTN/vec": "head_halves_k_transposed",
    "FLASH_ATTN": "split_last_dim",
    "FLASHINFER": "split_last_dim",
    "TRITON_ATTN": "split_last_dim",
}


def backend_key(attention_layer) -> str:
    """"<backend name>" or, for the CPU backend, "<backend name>/<kernel ISA>"."""
    name = attention_layer.attn_backend.get_name()
    isa = getattr(attention_layer, "isa", None)
    return f"{name}/{isa}" if name == "CPU_ATTN" else name


def layout_for_backend(key: str) -> Layout:
    """The layout of a backend (backend_key); ValueError naming it and the known ones if it is
    not known."""
    name = BACKEND_LAYOUTS.get(key)
    if name is None:
        raise ValueError(f"cachemgr's vLLM connector does not know the KV layout of attention "
                         f"backend {key!r} (known: {', '.join(sorted(BACKEND_LAYOUTS))}); it "
                         f"refuses to guess")
    return LAYOUTS[name]


def verify_layout(layout: Layout, layer_name: str, kv_layer, attention_layer,
                  head_dim: int) -> None:
    """Writes known K/V rows into a scratch copy of two blocks of `kv_layer` through the
    backend's own cache-write op (attention_layer.impl.do_kv_cache_update, the op vLLM's
    forward uses), reads them back through `layout`, and raises ValueError naming the layout,
    the layer and the backend unless every bit matches."""
    import torch

    impl = getattr(attention_layer, "impl", None)
    backend = type(impl).__name__ if impl is not None else type(attention_layer).__name__
    update = getattr(impl, "do_kv_cache_update", None)
    if update is None:
        raise ValueError(f"cannot verify the KV layout of {layer_name} ({backend}): the backend "
                         f"has no separate cache-write op (do_kv_cache_update)")
    num_blocks = min(2, kv_layer.shape[0])
    scratch = torch.zeros_like(kv_layer[:num_blocks])
    k_view, _ = layout.views(scratch, head_dim)
    _, heads, block_size, _ = k_view.shape
    tokens = num_blocks * block_size
    generator = torch.Generator().manual_seed(20261206)
    slots = torch.randperm(tokens, generator=generator)
    key = torch.randn((tokens, heads, head_dim), generator=generator).to(kv_layer.dtype)
    value = torch.randn((tokens, heads, head_dim), generator=generator).to(kv_layer.dtype)
    device = kv_layer.device
    key, value, slots = key.to(device), value.to(device), slots.to(device)
    update(attention_layer, key, value, scratch, slots)
    k_read, v_read = layout.gather(scratch, head_dim, slots // block_size, slots % block_size)
    bits = {2: torch.int16, 4: torch.int32, 1: torch.int8}[kv_layer.element_size()]
    k_ok = torch.equal(k_read.contiguous().view(bits), key.view(bits))
    v_ok = torch.equal(v_read.contiguous().view(bits), value.view(bits))
    if not (k_ok and v_ok):
        wrong = " and ".join(n for n, ok in (("K", k_ok), ("V", v_ok)) if not ok)
        raise ValueError(f"KV layout {layout.name!r} does not match what {backend} wrote into "
                         f"{layer_name} (shape {tuple(kv_layer.shape)}, strides "
                         f"{tuple(kv_layer.stride())}, {kv_layer.dtype}): {wrong} rows read "
                         f"back differ; the connector refuses to move KV it cannot place")
