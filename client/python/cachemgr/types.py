"""Plain data types of the client (no protobuf types leak out of the package)."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    from .errors import CacheManagerError

DTYPES = {"fp16": 1, "bf16": 2, "fp32": 3}
LAYOUTS = {"flash_attn": 1, "flashinfer": 2}
ROPE_STYLES = {"none": 1, "interleaved": 2, "half_split": 3}
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass
class RopeConfig:
    style: str = "interleaved"  # "none", "interleaved" (GPT-J, llama2.c) or "half_split" (HF)
    theta: float = 10000.0
    scaling_factor: float = 1.0
    rotary_dim: int = 0  # 0: head_dim


@dataclass
class ModelSpec:
    """What the daemon needs to know about a model's KV cache. Clients attaching with the same
    name and description share one pool."""

    name: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "fp16"  # "fp16", "bf16" or "fp32"
    block_size: int = 16
    layout: str = "flash_attn"  # vLLM's FlashAttention [2, blocks, ...] or "flashinfer"
    rope: RopeConfig = field(default_factory=RopeConfig)


@dataclass
class BlockCopy:
    src_block: int
    dst_block: int


@dataclass
class LayerAllocation:
    layer: int
    new_block_ids: List[int]
    slot_mapping: np.ndarray  # int64 [new tokens]: block * block_size + offset
    num_tokens: int
    copies: List[BlockCopy]


@dataclass
class Allocation:
    sequence_id: str
    created: bool
    first_position: int
    num_positions: int
    layers: List[LayerAllocation]


class StepOp(NamedTuple):
    """One op of Session.step: build with StepOp.allocate / free / fork / match_prefix.
    Immutable (a named tuple: a scheduler builds hundreds a step, three times faster than a
    frozen dataclass)."""
    kind: str  # "allocate", "free", "fork", "match_prefix"
    sequence_id: str  # allocate, free; fork: the parent
    child_sequence_id: str = ""
    num_new_tokens: int = 0
    block_hashes: Tuple[bytes, ...] = ()  # match_prefix

    @staticmethod
    def allocate(sequence_id: str, num_new_tokens: int) -> "StepOp":
        return StepOp("allocate", sequence_id, "", num_new_tokens)

    @staticmethod
    def free(sequence_id: str) -> "StepOp":
        return StepOp("free", sequence_id)

    @staticmethod
    def fork(parent_sequence_id: str, child_sequence_id: str) -> "StepOp":
        return StepOp("fork", parent_sequence_id, child_sequence_id)

    @staticmethod
    def match_prefix(block_hashes: Sequence[bytes]) -> "StepOp":
        """Session.match_prefix's lookup (read-only): StepResult.matched_blocks."""
        return StepOp("match_prefix", "", block_hashes=tuple(block_hashes))


class StepResult:
    """What one op of Session.step did. `error` is None when it succeeded, else the
    CacheManagerError its own call would have raised (nothing of the op was applied).
    `layers`: an allocation's layers that gained blocks or copies (every layer, with slot
    mappings, when requested; slot_mapping is empty otherwise). When every layer got the same
    (block tables grow in step until compression makes them differ), `all_layers` holds that one
    allocation (its layer is 0) and `layers` expands it on first use: a scheduler that reads
    `all_layers` when set skips building an entry per layer. `blocks_released`: a free's.
    `matched_blocks`: a prefix lookup's. A step answers hundreds of these, and a scheduler reads
    a few fields of most: a successful op's fields are read from the reply message when first
    used (`raw`; `convert_layers` turns its LayerAllocation messages into LayerAllocation)."""
    __slots__ = ("error", "_raw", "_num_layers", "_convert", "_all_layers", "_layers")

    def __init__(self, error: Optional["CacheManagerError"], raw=None, num_layers: int = 0,
                 convert_layers=None):
        self.error = error
        self._raw = raw
        self._num_layers = num_layers
        self._convert = convert_layers
        self._all_layers = StepResult  # not read yet (None once read and absent)
        self._layers = None

    @property
    def created(self) -> bool:
        return self._raw is not None and self._raw.created

    @property
    def first_position(self) -> int:
        return 0 if self._raw is None else self._raw.first_position

    @property
    def num_positions(self) -> int:
        return 0 if self._raw is None else self._raw.num_positions

    @property
    def blocks_released(self) -> int:
        return 0 if self._raw is None else self._raw.blocks_released

    @property
    def matched_blocks(self) -> int:
        return 0 if self._raw is None else self._raw.matched_blocks

    @property
    def all_layers(self) -> Optional[LayerAllocation]:
        if self._all_layers is StepResult:
            raw = self._raw
            self._all_layers = (self._convert([raw.all_layers])[0]
                                if raw is not None and raw.HasField("all_layers") else None)
        return self._all_layers

    @property
    def layers(self) -> List[LayerAllocation]:
        if self._layers is None:
            a = self.all_layers
            if a is not None:
                self._layers = [
                    LayerAllocation(l, list(a.new_block_ids), a.slot_mapping, a.num_tokens,
                                    list(a.copies)) for l in range(self._num_layers)]
            else:
                raw = self._raw
                self._layers = (self._convert(raw.layers)
                                if raw is not None and raw.layers else [])
        return self._layers

    @property
    def ok(self) -> bool:
        return self.error is None

    def __repr__(self) -> str:
        return (f"StepResult(error={self.error!r}, created={self.created}, "
                f"first_position={self.first_position}, num_positions={self.num_positions}, "
                f"layers={self.layers!r}, blocks_released={self.blocks_released}, "
                f"matched_blocks={self.matched_blocks})")


@dataclass
class LayerBlockTable:
    layer: int
    num_tokens: int
    block_ids: List[int]
    kv_digest: int = 0
    # Compression state: held as a codebook in the daemon's arena, parked (no blocks until
    # fetch), the codebooks' sizes and the arena's honest bytes.
    codebook: bool = False
    parked: bool = False
    key_codebook_size: int = 0
    value_codebook_size: int = 0
    arena_bytes: int = 0


@dataclass
class SequenceInfo:
    sequence_id: str
    owner_client_id: str
    num_positions: int
    layers: List[LayerBlockTable]
    parent_sequence_id: str = ""
    compressed: bool = False
    compression_policy: str = ""
    kept_per_layer: List[int] = field(default_factory=list)
    busy: str = ""
    # A background Compress is unfinished; ready: its work is done (finish_compress applies it).
    compress_pending: bool = False
    compress_ready: bool = False
    compress_error: str = ""  # the last background compress's work failed: its status


@dataclass
class StoredPrefix:
    stored: int           # new entries
    already_stored: int   # hashes the pool held already (or repeated in the call)
    codebook_layers: int = 0  # of the new entries' layers, those held as codebooks
    codebook_bytes: int = 0   # their bytes


@dataclass(frozen=True)
class PrefixCodebook:
    """Hold stored prefix blocks as SpindleKV similarity codebooks (every token kept, fewer
    bytes, rebuilt on load; lossy). 0 takes the "codebook" preset's thresholds (0.98, 0.95).
    first_position: the RoPE position of row 0 of the first stored block (None: its index
    times block_size), for blocks copied into a scratch sequence from elsewhere in a prompt."""
    theta_k: float = 0.0
    theta_v: float = 0.0
    first_position: Optional[int] = None


@dataclass
class LoadedPrefix:
    loaded_blocks: int    # leading hashes served (blocks per layer of `sequence`)
    corrupt_blocks: int   # entries that failed their digest: dropped, not served
    sequence: Optional[SequenceInfo]  # None when nothing was served


@dataclass
class SequenceSummary:
    sequence_id: str
    owner_client_id: str
    owner_client_name: str
    num_positions: int
    num_blocks: int


@dataclass
class CompressedLayer:
    layer: int
    context_ratio: float
    kept_per_head: int
    num_tokens: int
    block_ids: List[int]
    kept_positions: np.ndarray  # uint32 [num_kv_heads, num_tokens]
    codebook: bool
    key_codebook_size: int
    value_codebook_size: int
    bytes_held: int
    eq15_ratio: float


@dataclass
class CompressResult:
    layers: List[CompressedLayer]
    bytes_before: int
    bytes_after: int
    honest_ratio: float
    eq15_ratio: float
    reserve_ratio: float
    blocks_released: int
    # A background Compress started, or (finish_compress without wait) still working: nothing
    # else is set.
    pending: bool = False
    # finish_compress: rows each layer had appended since the background Compress started.
    rows_appended: int = 0


@dataclass
class FetchedLayer:
    layer: int
    num_tokens: int
    block_ids: List[int]
    positions: np.ndarray  # uint32 [num_kv_heads, num_tokens]; empty if never compressed
    new_blocks: int


@dataclass
class ParkedLayer:
    layer: int
    num_tokens: int
    rows_appended: int
    matched: int
    queued: int
    batch_coded: int
    new_entries: int
    key_codebook_size: int
    value_codebook_size: int
    queued_total: int
    arena_bytes: int
    blocks_released: int


@dataclass
class LayerOccupancy:
    layer: int
    capacity_blocks: int
    used_blocks: int
    free_blocks: int
    shared_blocks: int
    # Released by an expired client, held back until the daemon's quarantine ends:
    # free + used + quarantined == capacity.
    quarantined_blocks: int = 0


@dataclass
class PoolStats:
    pool_id: str
    model_name: str
    backend: str
    device: str
    bytes: int
    clients: int
    layers: List[LayerOccupancy]
    prefix_entries: int = 0      # stored prefix blocks (one block in every layer each)
    prefix_only_blocks: int = 0  # blocks (summed over layers) only the prefix store holds
    prefix_bytes: int = 0        # the entries' host memory (bookkeeping + codebooks), charged
    prefix_codebook_layers: int = 0  # entries' layers held as codebooks (summed)
    prefix_codebook_bytes: int = 0   # their bytes (part of prefix_bytes)
    group_name: str = ""         # a tensor-parallel group's pool (bytes: every rank's)
    group_size: int = 1
    group_ranks_attached: int = 0


@dataclass
class ClientInfo:
    client_id: str
    client_name: str
    pool_id: str
    sequences: int
    lease_remaining_ms: int
    group_rank: int = 0  # its rank when its pool is a group's


@dataclass
class Stats:
    pools: List[PoolStats]
    clients: List[ClientInfo]
    num_sequences: int
    uptime_ms: int
    version: str
    memory_used_bytes: int = 0
    # Daemon-wide prefix-store counters (operator view only): stored, hits, misses, evictions,
    # corrupt, pools_reclaimed.
    prefix: Dict[str, int] = field(default_factory=dict)


@dataclass
class Policy:
    """A compression preset and overrides (None keeps the preset's value); see
    docs/COMPRESSION.md. Presets: fullkv, streamingllm, h2o, snapkv, pyramidkv, pyramidinfer,
    zigzagkv, codebook, spindlekv; "" is the daemon's default (snapkv, docs/QUALITY.md)."""

    preset: str = ""
    schedule: Optional[str] = None  # "full", "uniform", "pyramid", "zigzag"
    beta: Optional[float] = None
    zigzag_tau: Optional[float] = None
    zigzag_min_fraction: Optional[float] = None
    scoring: Optional[str] = None  # "window", "accumulated", "sinks_recent"
    window: Optional[int] = None
    normalization: Optional[str] = None  # "literal", "sum"
    pooling: Optional[str] = None  # "none", "avg", "max"
    pool_kernel: Optional[int] = None
    sinks: Optional[int] = None
    gqa: Optional[str] = None  # "group_mean", "repeat"
    codebook: Optional[bool] = None
    theta_k: Optional[float] = None
    theta_v: Optional[float] = None
    codebook_scope: Optional[str] = None  # "layer", "kv_head"
    codebook_only_if_smaller: Optional[bool] = None
    append_batch: Optional[int] = None
    codebook_search: Optional[str] = None  # "exact", "lsh"


@dataclass
class TransferResult:
    """What Session.transfer_sequence did (docs/MULTINODE.md)."""
    destination_sequence_id: str
    payload_bytes: int  # row bytes sent: K and V of every row, in the pool's dtype
    wire_bytes: int  # serialized bytes of the stream's messages
    layer_digests: List[int]  # XXH3-64 per layer, equal on both sides
    source_released: bool  # a move freed the source
    replayed: bool  # the transfer_id had completed before: nothing was sent again
    # The row link the rows took ("nccl", "socket"; empty: the stream), and whether it had
    # carried an earlier transfer (docs/MULTINODE.md, "Row links").
    row_link: str = ""
    row_link_reused: bool = False
