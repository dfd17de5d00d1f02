"""A vLLM v1 KV connector backed by cachemgrd, with the method names and roles of vLLM's
`KVConnectorBase_V1` (vllm/distributed/kv_transfer/kv_connector/v1/base.py).

Load it in vLLM with

    --kv-transfer-config '{"kv_connector": "CacheManagerConnector",
        "kv_connector_module_path": "cachemgr.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"socket": "/run/cachemgr/cachemgr.sock"}}'

Two ways of keeping KV, chosen by `prefix_store` (on by default inside vLLM):

Prefix store (docs/PREFIX_STORE.md): blocks keyed by vLLM's own chained block hashes
(Request.block_hashes; `--prefix-caching-hash-algo sha256_cbor` makes them reproducible in every
process and language), held by the daemon for every engine attached to the same model, after
the engine that stored them is gone, until evicted.
  scheduler  get_num_new_matched_tokens asks the daemon (a one-lookup Step on the scheduler's
             own session, over the fast path) how many leading blocks it holds and reports them past what vLLM
             computed; update_state_after_alloc schedules the load into the blocks vLLM gave;
             build_connector_meta schedules every block that is full of computed tokens after
             the step (prompt and output alike) to be stored once;
  worker     start_load_kv loads (LoadPrefix pins the blocks and checks their digests, the rows
             are copied into vLLM's blocks); wait_for_save copies the new full blocks into a
             scratch sequence, stores them under their hashes (StorePrefix) and frees it.
A preempted request is matched again when it resumes, so it loads what was stored of it.

Per-request copies (prefix_store false): the sidecar as a compressed store for requests' KV
(sequence "vllm-<request id>" in the daemon):
  prefill    save_kv_layer copies the tokens vLLM computed this step from vLLM's paged KV into
             the sidecar pool (Allocate, then zero-copy writes through the mapped pool);
  end of     wait_for_save starts compressing the saved prompt with the configured policy in
  prefill    the background (Compress with background: the call returns once the daemon has
             the inputs, so the forward never waits for it) and a later step applies it
             (FinishCompress, without waiting while the daemon works; waiting only when the
             copy is needed first: a load, a preemption, a move); codebook layers park in the
             daemon's arena and hold no blocks;
  decode     nothing is copied: vLLM keeps attending to its own blocks;
  preempted  (SchedulerOutput.preempted_req_ids) handle_preemptions fetches the sidecar copy,
             appends the tokens decoded since and parks it again (Park codes the new rows into
             the codebook), before vLLM reuses the request's blocks;
  resumed    get_num_new_matched_tokens reports the tokens the sidecar holds, the scheduler
             allocates blocks for them, start_load_kv fetches (reconstructs) the sequence and
             copies it into those blocks, then parks it again;
  finished   request_finished forgets it; the worker's get_finished(finished_req_ids) frees the
             sidecar sequence.
Loads are synchronous (start_load_kv returns when the KV is in place; get_finished reports
nothing).

Prefill on one node, decode on another (vLLM's kv_role; docs/MULTINODE.md, "The vLLM path"):
a kv_producer engine prefills, its daemon moves each prompt's KV to the decode engine's daemon,
and a kv_consumer engine loads it from its own daemon. The proxy in front of them (as for vLLM's
other P/D connectors) passes kv_transfer_params:
  to the prefill engine (max_tokens 1): {"do_remote_decode": true, "cachemgr_peer": the decode
             daemon (address or node name from `cachemgrctl peers`), "cachemgr_session_token":
             the decode worker's session token (the consumer writes it to its
             `session_token_file`, mode 0600, and again after a re-attach), "cachemgr_sequence":
             a name for the prompt there, optional "cachemgr_transfer_id" (default: the name)};
             the worker saves the prompt as on the per-request path, compresses it with
             `policy`, and moves it (TransferSequence, move: the daemons send it as held,
             codebook layers as codebooks) into that session. request_finished answers
             {"do_remote_prefill": true, "cachemgr_sequence": .., "remote_num_tokens": ..};
  to the decode engine: those params. get_num_new_matched_tokens reports every prompt token
             but the last, start_load_kv copies them from the moved sequence (reconstructing
             codebook layers) and frees it. A move that failed or a sequence that never came is
             a load error: vLLM recomputes the prompt. Only token-preserving policies (fullkv,
             codebook) give sequences vLLM can attend to; kv_both does both roles.

The sidecar never takes vLLM down. Every sidecar failure becomes a cache miss or a recompute,
never an exception out of the connector: while cachemgrd is unreachable (or the worker's session
is lost) get_num_new_matched_tokens reports nothing (the scheduler probes the socket, at most
once per `reconnect_interval` seconds), saves and compressions are skipped, and a load that
cannot be served puts its blocks in get_block_ids_with_load_errors() (vLLM recomputes them; the
scheduler hears of them in update_connector_output and stops offering that request). A request
whose sidecar copy belonged to a lost session, or missed a save, is never loaded or extended
again. The worker re-attaches on its own when the daemon is back (Session.reattach) and saves
new requests from then on; `stats` counts sidecar_errors, skipped_saves, load_errors and
reattaches. A stock vLLM attention needs one KV row per token position, so only sequences whose
layers kept every token can be loaded back: token-preserving policies (codebook, fullkv) give
loadable sequences; with an evicting policy (e.g. spindlekv) the sidecar copy still saves memory
and is reported, but get_num_new_matched_tokens returns 0 for it and vLLM recomputes.

In vLLM the connector subclasses vLLM's own KVConnectorBase_V1 (0.32; initialised through its
__init__, metadata in its slot) and takes the model's shape, dtype (bf16 moved bit for bit),
block size and RoPE from vLLM's config. register_kv_caches finds each layer's attention backend,
looks up where that backend keeps K and V (vllm_layout.py) and proves it by writing known rows
through the backend's own cache-write op; an unknown backend or a mismatch stops vLLM at start
with a message naming the layout. Counters reach vLLM's logs and Prometheus metrics
(get_kv_connector_stats, build_prom_metrics: vllm:cachemgr_*).

Outside vLLM (tests/python/test_vllm_connector.py drives it with a scripted scheduler) the
module loads without vLLM or torch; pass `config` (with "layout") and numpy KV caches. Attributes
read from vLLM's objects:
  Request: request_id, prompt_token_ids, num_tokens, num_computed_tokens
  KVCacheBlocks: get_block_ids() -> tuple of block id lists (one per KV cache group; group 0)
  SchedulerOutput: scheduled_new_reqs[i].req_id / .block_ids / .num_computed_tokens,
    scheduled_cached_reqs.req_ids / .new_block_ids / .num_computed_tokens /
    .resumed_req_ids (or .resumed_from_preemption),
    num_scheduled_tokens (dict req_id -> tokens this step), finished_req_ids,
    preempted_req_ids (set; optional)
  kv_caches (register_kv_caches): {layer name: [num_blocks, kv_heads, block_size, 2 * head_dim]}
    (vLLM 0.32's logical shape); the layer index is the first integer in the name
    ("model.layers.7.self_attn.attn" -> 7).
"""

import dataclasses
import logging
import os
import re
import socket
import tempfile
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import grpc
import numpy as np

from ..errors import CacheManagerError
from ..session import Session
from ..types import ModelSpec, Policy, PrefixCodebook, StepOp

_log = logging.getLogger("cachemgr.vllm")

try:  # only for subclassing when vLLM is present; the adapter works without it
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorBase_V1 as _Base, KVConnectorMetadata as _MetaBase)
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (  # type: ignore
        KVConnectorPromMetrics as _PromBase, KVConnectorStats as _StatsBase)
    HAVE_VLLM = True
except Exception:  # noqa: BLE001 - vLLM absent (or another version): plain classes
    HAVE_VLLM = False
    _MetaBase = object
    _PromBase = object

    class _Base:  # the part of KVConnectorBase_V1 the connector relies on
        def __init__(self, vllm_config, role, kv_cache_config):
            self._connector_metadata = None
            self._role = role

        @property
        def role(self):
            return self._role

        def bind_connector_metadata(self, connector_metadata) -> None:
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self) -> None:
            self._connector_metadata = None

        def has_connector_metadata(self) -> bool:
            return self._connector_metadata is not None

    @dataclasses.dataclass
    class _StatsBase:
        data: Dict[str, Any] = dataclasses.field(default_factory=dict)

# The connector's counters: vLLM logs them and exports each as vllm:cachemgr_<name>_total.
_COUNTERS = {
    "saved_tokens": "Tokens whose KV the connector copied into cachemgrd",
    "loaded_tokens": "Tokens whose KV the connector loaded from cachemgrd into vLLM's blocks",
    "compressions": "Prompts whose compression in cachemgrd the connector started",
    "parks": "Sequences returned to cachemgrd's arena after a load or a preemption",
    "bytes_before": "KV bytes of the compressed prompts before compression",
    "bytes_after": "KV bytes of the compressed prompts after compression",
    "sidecar_errors": "Failed calls to cachemgrd (each became a cache miss or a recompute)",
    "skipped_saves": "Saves skipped because cachemgrd was unavailable",
    "load_errors": "Loads that failed and were reported to vLLM for recompute",
    "reattaches": "Times the worker re-attached to cachemgrd after losing its session",
    "prefix_stored_blocks": "Blocks the connector stored in cachemgrd's prefix store (new ones)",
    "prefix_hit_tokens": "Prompt tokens loaded from cachemgrd's prefix store",
    "remote_sends": "Prefilled prompts moved to a decode instance's daemon (kv_producer)",
    "remote_send_bytes": "KV bytes those moves carried (as held: compressed rows, codebooks)",
    "remote_send_failures": "Prefilled prompts that could not be moved (the decode recomputes)",
    "remote_loaded_tokens": "Prompt tokens loaded from a prefill instance's KV (kv_consumer)",
    "prefix_corrupt_blocks": "Stored blocks cachemgrd found corrupt at load (recomputed)",
    "load_us": "Microseconds the worker spent loading KV before the forward (start_load_kv)",
    "save_us": "Microseconds the worker spent saving KV after the forward (wait_for_save)",
    "compress_wait_us": "Microseconds the worker waited for a background compression it needed",
}


class CacheManagerConnectorStats(_StatsBase):
    """Counter increments since the last report (KVConnectorStats): summed across workers and
    intervals, reduced to the sums."""

    def reset(self):
        self.data = {}

    def aggregate(self, other):
        for key, value in (other.data or {}).items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self):
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class CacheManagerPromMetrics(_PromBase):
    """The counters as Prometheus counters, one child per engine (KVConnectorPromMetrics)."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._children = {}
        for key, documentation in _COUNTERS.items():
            counter = self._counter_cls(name=f"vllm:cachemgr_{key}", documentation=documentation,
                                        labelnames=labelnames)
            for engine, values in per_engine_labelvalues.items():
                self._children[(engine, key)] = counter.labels(*values)

    def observe(self, transfer_stats_data: Dict[str, Any], engine_idx: int = 0):
        for key, value in (transfer_stats_data or {}).items():
            child = self._children.get((engine_idx, key))
            if child is not None and value > 0:
                child.inc(value)


_VLLM_DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


# Failures that mean "the sidecar is not there right now", not "this is misconfigured".
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED)


class KVConnectorRole:
    """Values of vLLM's enum (SCHEDULER = 0, WORKER = 1), for use without vLLM."""
    SCHEDULER = 0
    WORKER = 1


@dataclasses.dataclass
class _Transfer:
    sequence_id: str
    block_ids: List[int]   # vLLM block ids covering the tokens
    first_token: int       # tokens [first_token, first_token + num_tokens) of the request
    num_tokens: int
    request_id: str = ""
    # A prefill instance's KV moved into this worker's session (kv_consumer): loaded once,
    # then freed.
    remote: bool = False


@dataclasses.dataclass
class _RemoteSend:
    """kv_producer: a prefilled prompt to move to the decode instance's daemon."""
    sequence_id: str             # the worker's copy
    peer: str                    # the decode side's daemon (address or node name)
    session_token: str           # the decode worker's session there
    destination_sequence_id: str
    transfer_id: str


@dataclasses.dataclass
class _PrefixTransfer:
    request_id: str
    block_ids: List[int]       # vLLM block ids of the request (group 0)
    first_block: int           # hashes[i] is the hash of the request's block first_block + i
    hashes: List[bytes]
    num_tokens: int = 0        # loads: tokens to fill from token first_block * block_size


@dataclasses.dataclass
class CacheManagerConnectorMetadata(_MetaBase):
    """Scheduler -> worker, per step."""
    saves: List[_Transfer] = dataclasses.field(default_factory=list)
    compress_after_save: List[str] = dataclasses.field(default_factory=list)
    loads: List[_Transfer] = dataclasses.field(default_factory=list)
    preempted: List[_Transfer] = dataclasses.field(default_factory=list)
    # Preempted before their prompt was saved whole: the partial copy is dropped, and the
    # prefill that vLLM redoes saves it again.
    dropped: List[str] = dataclasses.field(default_factory=list)
    finished: List[str] = dataclasses.field(default_factory=list)
    # Prefill/decode (kv_role): prompts to move to a decode instance after their save (and
    # compression), and moved-in sequences the scheduler will not load (freed).
    remote_sends: List[_RemoteSend] = dataclasses.field(default_factory=list)
    remote_frees: List[str] = dataclasses.field(default_factory=list)
    # Prefix store (prefix_store on): full blocks to store under their hashes, and stored
    # prefixes to load into vLLM's blocks.
    prefix_saves: List["_PrefixTransfer"] = dataclasses.field(default_factory=list)
    prefix_loads: List["_PrefixTransfer"] = dataclasses.field(default_factory=list)


def _prefix_codebook(value) -> Optional[PrefixCodebook]:
    """kv_connector_extra_config "prefix_codebook": false, true or {"theta_k", "theta_v"}."""
    if value is False or value is None:
        return None
    if value is True:
        return PrefixCodebook()
    if isinstance(value, dict):
        unknown = set(value) - {"theta_k", "theta_v"}
        if unknown:
            raise ValueError(f"kv_connector_extra_config prefix_codebook has unknown keys "
                             f"{sorted(unknown)}; it takes theta_k and theta_v")
        codebook = PrefixCodebook(float(value.get("theta_k", 0.0)),
                                  float(value.get("theta_v", 0.0)))
        for name in ("theta_k", "theta_v"):
            theta = getattr(codebook, name)
            if not 0.0 <= theta <= 1.0 or theta != theta:
                raise ValueError(f"kv_connector_extra_config prefix_codebook.{name} must be in "
                                 f"(0, 1], or 0 for the preset's (got {theta})")
        return codebook
    raise ValueError(f"kv_connector_extra_config prefix_codebook must be true, false or "
                     f"{{\"theta_k\": .., \"theta_v\": ..}} (got {value!r})")


def _torch_planes(pool, layer: int, dtype):
    """(K, V) of a host pool's layer as torch tensors of `dtype` ([num_blocks, block_size,
    kv_heads, head_dim] views, no copy), or None if the pool holds another dtype."""
    import torch
    held = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if held.get(pool.model.dtype) != dtype:
        return None
    planes = []
    for plane in (pool.key_cache(layer), pool.value_cache(layer)):
        if dtype == torch.bfloat16:  # numpy holds bf16 as its uint16 bits
            planes.append(torch.from_numpy(plane.view(np.int16)).view(torch.bfloat16))
        else:
            planes.append(torch.from_numpy(plane))
    return planes


def _sequence_id(request_id: str) -> str:
    return f"vllm-{request_id}"


_KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")


def _transfer_params(request) -> Dict[str, Any]:
    """The request's kv_transfer_params (vLLM: from SamplingParams.extra_args), or {}."""
    params = getattr(request, "kv_transfer_params", None)
    return params if isinstance(params, dict) else {}


def _write_secret(path: str, text: str) -> None:
    """Writes `text` to `path` (mode 0600) by rename, so a reader never sees half of it; the
    temporary file is a fresh one (mkstemp: O_EXCL, 0600), never a name planted beside it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix=".cachemgr-token-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _role_value(role) -> int:
    return getattr(role, "value", role)


def _rope_theta(hf_config) -> float:
    """RoPE base of a Hugging Face config: transformers 5 keeps it in rope_parameters."""
    parameters = getattr(hf_config, "rope_parameters", None)
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise ValueError("the model's config has no rope_theta (nor rope_parameters.rope_theta)")
    return float(theta)


def _config_from_vllm(vllm_config) -> Dict[str, Any]:
    """kv_connector_extra_config, completed with the model's shape, dtype, block size and RoPE
    from vLLM's own config (explicit extra-config keys win)."""
    config = dict(getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", None)
                  or {})
    model_config = getattr(vllm_config, "model_config", None)
    cache_config = getattr(vllm_config, "cache_config", None)
    if model_config is not None:
        hf = model_config.hf_text_config if hasattr(model_config, "hf_text_config") \
            else model_config.hf_config
        config.setdefault("num_layers", hf.num_hidden_layers)
        config.setdefault("num_q_heads", hf.num_attention_heads)
        config.setdefault("num_kv_heads", getattr(hf, "num_key_value_heads", None) or
                          hf.num_attention_heads)
        config.setdefault("head_dim", getattr(hf, "head_dim", None) or
                          hf.hidden_size // hf.num_attention_heads)
        config.setdefault("rope_theta", _rope_theta(hf))
        config.setdefault("model_name", model_config.model)
        dtype = _VLLM_DTYPES.get(str(model_config.dtype))
        if dtype is None:
            raise ValueError(f"cachemgr's vLLM connector supports KV of dtype bfloat16, float16 "
                             f"or float32, not {model_config.dtype}")
        config.setdefault("dtype", dtype)
    if cache_config is not None:
        cache_dtype = str(getattr(cache_config, "cache_dtype", "auto"))
        if cache_dtype != "auto":
            raise ValueError(f"cachemgr's vLLM connector moves KV in the model's dtype; "
                             f"--kv-cache-dtype {cache_dtype} is not supported")
        config.setdefault("block_size", cache_config.block_size)
    return config


class CacheManagerConnector(_Base):
    """See the module docstring. `config` holds the kv_connector_extra_config keys:
    socket (required), prefix_store (true in vLLM: see the module docstring), prefix_codebook
    (false; true or {"theta_k", "theta_v"}: stored blocks held as codebooks; the keys below
    up to background_compress apply to the per-request path), policy ("codebook"),
    reserve_ratio (1.0) or byte_ratio, window (32), background_compress (true: compressions run
    off the forward's path; false: wait_for_save waits for each),
    client_name, reconnect_interval (1.0 s: how often a lost sidecar is probed or re-attached),
    layout (only to name a backend's layout explicitly; it is verified all the same),
    kv_mem_pool (false; true: vLLM's KV cache in a CUDA pool of the daemon, see
    get_mem_pool_context and vllm_mem_pool.py) and mem_pool_library (its allocator library;
    default: the one built into this package),
    and, taken from vLLM's config when run in vLLM: num_layers, num_q_heads, num_kv_heads,
    head_dim, dtype, block_size, rope_style ("half_split", vLLM's), rope_theta.
    Outside vLLM, pass `config` directly."""

    def __init__(self, vllm_config=None, role=None, kv_cache_config=None,
                 config: Optional[Dict[str, Any]] = None):
        if role is None:
            role = KVConnectorRole.WORKER
        if config is None:
            config = _config_from_vllm(vllm_config)
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = getattr(vllm_config, "kv_transfer_config", None)
        if getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
            # vLLM's default fails the request whose load failed; a cache that is down or lost a
            # copy must cost a recompute, never a request. The scheduler reads the policy right
            # after it creates its connector.
            _log.info("cachemgr connector: kv_load_failure_policy %r -> 'recompute' (a failed "
                      "load is recomputed, never a failed request)",
                      transfer.kv_load_failure_policy)
            transfer.kv_load_failure_policy = "recompute"
        if "socket" not in config:
            raise ValueError("kv_connector_extra_config needs \"socket\" (cachemgrd's socket)")
        # Prefill/decode roles (the module docstring): vLLM's kv_role, or config["kv_role"].
        self.kv_role = str(getattr(transfer, "kv_role", None) or config.get("kv_role", "kv_both"))
        if self.kv_role not in _KV_ROLES:
            raise ValueError(f"kv_role must be one of {', '.join(_KV_ROLES)} "
                             f"(got {self.kv_role!r})")
        self.producer = self.kv_role in ("kv_producer", "kv_both")
        self.consumer = self.kv_role in ("kv_consumer", "kv_both")
        self.config = config
        self.policy = Policy(config.get("policy", "codebook"), window=config.get("window"))
        self.reserve_ratio = config.get("reserve_ratio")
        self.byte_ratio = config.get("byte_ratio")
        if self.reserve_ratio is None and self.byte_ratio is None:
            self.reserve_ratio = 1.0
        self.block_size = int(config.get("block_size", 16))
        self.reconnect_interval = float(config.get("reconnect_interval", 1.0))
        # Prefix store: blocks keyed by vLLM's own block hashes (Request.block_hashes), shared
        # across requests and engines. On by default in vLLM; the per-request path (compressed
        # copies for preemption) runs when it is off.
        self.prefix_store = bool(config.get("prefix_store", vllm_config is not None))
        # Stored blocks held as codebooks in the daemon (fewer bytes, lossy): false, true (the
        # preset's thresholds) or {"theta_k": .., "theta_v": ..}.
        self.prefix_codebook = _prefix_codebook(config.get("prefix_codebook", False))
        cache_config = getattr(vllm_config, "cache_config", None)
        algo = str(getattr(cache_config, "prefix_caching_hash_algo", "sha256"))
        if self.prefix_store and algo.startswith("xxhash") and "PYTHONHASHSEED" not in os.environ:
            _log.warning("cachemgr connector: prefix_caching_hash_algo %s without PYTHONHASHSEED "
                         "draws a random seed per process, so no other engine (nor this one "
                         "after a restart) can reuse its stored prefixes; use sha256_cbor", algo)
        # Scheduler side.
        self._block_ids: Dict[str, List[int]] = {}       # req id -> vLLM blocks (group 0)
        self._saved: Dict[str, int] = {}                 # req id -> tokens held by the sidecar
        self._loadable: Dict[str, bool] = {}             # rows == tokens in every layer
        self._prompt_len: Dict[str, int] = {}
        self._computed: Dict[str, int] = {}              # tokens with KV in vLLM's blocks
        self._compressed: Set[str] = set()               # prompt saved whole and compressed
        self._pending: CacheManagerConnectorMetadata = CacheManagerConnectorMetadata()
        self._probe_at = 0.0     # when the sidecar was last probed (time.monotonic)
        self._probe_up = True
        self._requests: Dict[str, Any] = {}              # req id -> vLLM Request (its hashes)
        self._stored_blocks: Dict[str, int] = {}         # req id -> leading blocks stored
        self._matched: Dict[str, Tuple[int, int]] = {}   # req id -> (blocks matched, local)
        self._scheduler_session: Optional[Session] = None
        self._scheduler_retry_at = 0.0
        self._remote_decode: Dict[str, _RemoteSend] = {}  # req id -> where its prompt goes
        # req id -> tokens vLLM had computed (its local prefix cache included) when the
        # moved-in prompt was matched: where the load starts.
        self._remote_local: Dict[str, int] = {}
        # Worker side.
        self.session: Optional[Session] = None
        self._kv_caches: Dict[int, Any] = {}
        self._layout = None                       # vllm_layout.Layout of the registered caches
        self._kernel_block_size = self.block_size  # tokens per block of the KV tensors
        self._generation_of: Dict[str, int] = {}  # sequence -> session generation that saved it
        self._broken: Set[str] = set()            # sequences whose sidecar copy is incomplete
        # Compressions started in the background and not yet applied (FinishCompress).
        self._compressing: Set[str] = set()
        self.background_compress = bool(config.get("background_compress", True))
        self._load_errors: Set[int] = set()       # vLLM block ids whose load failed
        self._retry_at = 0.0                      # next attach / reattach try (time.monotonic)
        self.stats = {key: 0 for key in _COUNTERS}
        self._reported = dict(self.stats)         # what get_kv_connector_stats last reported
        self._last_error: Optional[CacheManagerError] = None
        self._logged_at = -1e9
        self._unlogged = 0
        if _role_value(role) == KVConnectorRole.WORKER:
            if self._usable_session() is None and self._last_error is not None and \
                    self._last_error.code not in _TRANSIENT:
                raise self._last_error  # a configuration error, not an outage: say so at start
        # kv_mem_pool (get_mem_pool_context): vLLM's KV cache in a CUDA pool of the daemon.
        from . import vllm_mem_pool
        self.kv_mem_pool = vllm_mem_pool.enabled(config)
        self._kv_cache_config = kv_cache_config
        self._kv_cache_arena: Optional[vllm_mem_pool.KvCacheArena] = None
        if self.kv_mem_pool and _role_value(role) == KVConnectorRole.WORKER:
            try:
                vllm_mem_pool.check_at_start(self.session, self._last_error, vllm_config)
            except Exception:
                self.shutdown()
                raise

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a later miss, never a lost request

    # ---- stats -------------------------------------------------------------------------------

    def get_kv_connector_stats(self):
        """The counters' increments since the last call (None when nothing changed)."""
        delta = {k: v - self._reported.get(k, 0) for k, v in self.stats.items()}
        if not any(delta.values()):
            return None
        self._reported = dict(self.stats)
        return CacheManagerConnectorStats(data={k: v for k, v in delta.items() if v})

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return CacheManagerConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return CacheManagerPromMetrics(vllm_config, metric_types, labelnames,
                                       per_engine_labelvalues)

    # ---- worker side -------------------------------------------------------------------------

    def _model(self) -> ModelSpec:
        c = self.config
        from ..types import RopeConfig
        return ModelSpec(
            name=str(c.get("model_name", "vllm-model")).replace("/", "_"),
            num_layers=int(c["num_layers"]), num_q_heads=int(c["num_q_heads"]),
            num_kv_heads=int(c["num_kv_heads"]), head_dim=int(c["head_dim"]),
            dtype=c.get("dtype", "fp16"), block_size=self.block_size, layout="flash_attn",
            rope=RopeConfig(style=c.get("rope_style", "half_split"),
                            theta=float(c.get("rope_theta", 10000.0))))

    def _usable_session(self) -> Optional[Session]:
        """The worker's session if it can be used now; else tries (at most once per
        reconnect_interval) to attach or to re-attach after a loss, and returns None while the
        sidecar is unavailable."""
        s = self.session
        if s is not None and s.lease_ok:
            return s
        now = time.monotonic()
        if now < self._retry_at:
            return None
        self._retry_at = now + self.reconnect_interval
        try:
            if s is None:
                model = self._model()  # configuration errors surface here, as ValueError
                self.session = Session.attach(self.config["socket"],
                                              self.config.get("client_name", "vllm-worker"),
                                              model, num_blocks=int(self.config.get(
                                                  "num_blocks", 0)))
            else:
                s.reattach()
                self.stats["reattaches"] += 1
                # Everything the lost session held is gone.
                self._broken.update(self._generation_of)
                self._generation_of.clear()
                self._compressing.clear()
            self._publish_session_token()
            return self.session
        except CacheManagerError as e:
            self._sidecar_failed("attaching", e)
            return None

    def _publish_session_token(self) -> None:
        """kv_consumer with session_token_file: the worker's current session token, where the
        deployment's proxy reads it to hand it to prefill instances (cachemgr_session_token):
        the session prefilled prompts are moved into. Rewritten after each re-attach."""
        path = self.config.get("session_token_file")
        if path and self.consumer and self.session is not None:
            _write_secret(str(path), self.session.session_token)

    def _failed(self, what: str, error: Exception) -> None:
        """A save or load that failed: sidecar errors are counted and logged as outages; any
        other exception (a malformed reply, a bug) is logged with its traceback, and vLLM goes
        on all the same (the copy is never loaded; a load's blocks are recomputed)."""
        if isinstance(error, CacheManagerError):
            self._sidecar_failed(what, error)
            return
        self.stats["sidecar_errors"] += 1
        _log.error("cachemgr connector failed while %s (vLLM recomputes instead)", what,
                   exc_info=error)

    def _sidecar_failed(self, what: str, error: CacheManagerError) -> None:
        """Counts the failure; logs it, at most once per 10 s (an outage fails every call)."""
        self._last_error = error
        self.stats["sidecar_errors"] += 1
        now = time.monotonic()
        if now - self._logged_at < 10.0:
            self._unlogged += 1
            return
        _log.warning("cachemgr sidecar unavailable while %s (vLLM recomputes instead): %s%s",
                     what, error, f" ({self._unlogged} more failures since the last report)"
                     if self._unlogged else "")
        self._logged_at, self._unlogged = now, 0

    def _held_here(self, sequence_id: str) -> bool:
        """Whether the current session holds (part of) a copy of `sequence_id`."""
        return (self.session is not None and
                self._generation_of.get(sequence_id) == self.session.generation)

    def _fresh(self, sequence_id: str) -> bool:
        """Whether the sidecar copy of `sequence_id` is whole and lives in the current
        session."""
        return sequence_id not in self._broken and self._held_here(sequence_id)

    def get_mem_pool_context(self):
        """Where vLLM's GPU worker allocates its KV cache: with kv_mem_pool, a
        torch.cuda.use_mem_pool context over a region of a CUDA pool the daemon lends this
        worker alone, sized for vLLM's KV cache (vllm_mem_pool: the arena, opened at the first
        call and kept until shutdown); otherwise None (vLLM's own allocator). vLLM 0.32's CPU
        worker calls it too (it inherits the GPU worker's initialize_from_config) and gets None:
        kv_mem_pool on a host pool is refused at start."""
        if not self.kv_mem_pool:
            return None
        if self._kv_cache_arena is None:
            from . import vllm_mem_pool
            self._kv_cache_arena = vllm_mem_pool.KvCacheArena.open(
                self.config, self._model(), self._kv_cache_config)
        return self._kv_cache_arena.context()

    def register_kv_caches(self, kv_caches: Dict[str, Any]) -> None:
        """Records vLLM's per-layer paged KV tensors after proving their layout: each layer's
        attention backend names it (vllm_layout.BACKEND_LAYOUTS, or config "layout"), and known
        rows written through the backend's own cache-write op must read back bit for bit.
        Raises ValueError (vLLM does not start) for an unknown backend or a mismatch."""
        from . import vllm_layout
        layers = {}
        forward_context = {}
        vllm_config = getattr(self, "_vllm_config", None)
        if vllm_config is not None:
            forward_context = vllm_config.compilation_config.static_forward_context
        head_dim = int(self.config["head_dim"])
        for name, tensor in kv_caches.items():
            match = re.search(r"(\d+)", name)
            if match is None:
                raise ValueError(f"cannot tell the layer index of KV cache {name!r}")
            attention = forward_context.get(name)
            if "layout" in self.config:
                layout = vllm_layout.LAYOUTS.get(self.config["layout"])
                if layout is None:
                    raise ValueError(f"kv_connector_extra_config layout "
                                     f"{self.config['layout']!r} is not one of "
                                     f"{sorted(vllm_layout.LAYOUTS)}")
            elif attention is not None:
                layout = vllm_layout.layout_for_backend(vllm_layout.backend_key(attention))
            else:
                raise ValueError(f"no attention layer {name!r} in vLLM's forward context and no "
                                 f"\"layout\" in kv_connector_extra_config: the KV layout is "
                                 f"unknown")
            if attention is not None:
                vllm_layout.verify_layout(layout, name, tensor, attention, head_dim)
            if self._layout is not None and layout.name != self._layout.name:
                raise ValueError(f"layers use different KV layouts ({self._layout.name}, "
                                 f"{layout.name}); the connector supports one per model")
            self._layout = layout
            k_view, _ = layout.views(tensor, head_dim)
            self._kernel_block_size = int(k_view.shape[2])
            layers[int(match.group(1))] = tensor
        if self.block_size % self._kernel_block_size:
            raise ValueError(f"vLLM's block size {self.block_size} is not a multiple of the KV "
                             f"tensors' {self._kernel_block_size} tokens per block")
        if len(layers) != int(self.config["num_layers"]):
            raise ValueError(f"{len(layers)} KV caches registered for a model of "
                             f"{self.config['num_layers']} layers")
        self._kv_caches = layers

    def _slots(self, kv, block_ids: List[int], first: int, end: int):
        """(kernel block, offset) of tokens [first, end) of a request whose vLLM blocks are
        `block_ids`, as index arrays for `kv` (torch tensors on its device, or numpy)."""
        tokens = np.arange(first, end)
        per = self.block_size // self._kernel_block_size
        within = tokens % self.block_size
        blocks = (np.asarray(block_ids, dtype=np.int64)[tokens // self.block_size] * per +
                  within // self._kernel_block_size)
        offsets = within % self._kernel_block_size
        if hasattr(kv, "untyped_storage"):
            import torch
            return (torch.as_tensor(blocks, device=kv.device),
                    torch.as_tensor(offsets, device=kv.device))
        return blocks, offsets

    @staticmethod
    def _to_numpy(rows):
        """Rows of vLLM's cache as numpy, bit for bit (bf16 as its uint16 bits)."""
        if not hasattr(rows, "untyped_storage"):
            return np.asarray(rows)
        import torch
        rows = rows.contiguous()
        if rows.dtype == torch.bfloat16:
            return rows.view(torch.int16).cpu().numpy().view(np.uint16)
        return rows.cpu().numpy()

    @staticmethod
    def _like(kv, rows):
        """numpy rows from the sidecar's pool as values for `kv` (bf16 from its bits)."""
        if not hasattr(kv, "untyped_storage"):
            return rows
        import torch
        if kv.dtype == torch.bfloat16:
            return torch.from_numpy(np.ascontiguousarray(rows).view(np.int16)).view(
                torch.bfloat16).to(kv.device)
        return torch.from_numpy(np.ascontiguousarray(rows)).to(device=kv.device, dtype=kv.dtype)

    def _vllm_rows(self, layer: int, t: _Transfer):
        """(k, v) of the transfer's tokens from vLLM's paged tensor, [tokens, heads, dim]."""
        kv = self._kv_caches[layer]
        blocks, offsets = self._slots(kv, t.block_ids, t.first_token,
                                      t.first_token + t.num_tokens)
        kbs = self._kernel_block_size
        if t.first_token % kbs == 0 and t.num_tokens % kbs == 0:  # whole blocks (stores)
            k, v = self._layout.gather_blocks(kv, int(self.config["head_dim"]), blocks[::kbs])
        else:
            k, v = self._layout.gather(kv, int(self.config["head_dim"]), blocks, offsets)
        return self._to_numpy(k), self._to_numpy(v)

    def _write_to_pool(self, pool, layer: int, t: _Transfer, slots) -> None:
        """Copies the transfer's rows of one layer from vLLM's cache into the pool's slots."""
        if self._copy_blocks_to_pool(pool, layer, t, slots):
            return
        k, v = self._vllm_rows(layer, t)
        pool.write(layer, slots, k.astype(pool.dtype, copy=False),
                   v.astype(pool.dtype, copy=False))

    def _copy_blocks_to_pool(self, pool, layer: int, t: _Transfer, slots) -> bool:
        """Whole vLLM blocks of a CPU cache into whole blocks of a host pool of the same dtype
        and block size: one strided copy per block and plane, straight into the pool (half the
        memory traffic of a gather then a write). False, having copied nothing, otherwise."""
        kv = self._kv_caches[layer]
        if (pool.on_device or not hasattr(kv, "untyped_storage") or kv.device.type != "cpu" or
                pool.model.block_size != self.block_size or t.first_token % self.block_size or
                t.num_tokens % self.block_size):
            return False
        planes = _torch_planes(pool, layer, kv.dtype)
        targets = pool.whole_blocks(slots)
        if planes is None or targets is None:
            return False
        per = self.block_size // self._kernel_block_size
        first = t.first_token // self.block_size
        head_dim = int(self.config["head_dim"])
        for i, target in enumerate(targets):
            block = t.block_ids[first + i]
            self._layout.copy_blocks(kv, head_dim, range(block * per, (block + 1) * per),
                                     planes[0][target], planes[1][target])
        return True

    def _save(self, t: _Transfer) -> None:
        self._save_all([t])

    def _save_all(self, transfers: List[_Transfer]) -> None:
        """Appends each transfer's tokens to its sidecar sequence in every layer, all of them in
        one Step (docs/PERF.md "Step"); a transfer is skipped (and its sequence marked broken)
        when the sidecar is unavailable, its append failed or the copy is not whole."""
        s = self._usable_session()
        ops, eligible = [], []
        for t in transfers:
            if t.first_token == 0 and s is not None:
                if self._held_here(t.sequence_id):  # a broken copy: start over
                    self._free(t.sequence_id)
                self._broken.discard(t.sequence_id)
                self._generation_of[t.sequence_id] = s.generation
            if s is None or not self._fresh(t.sequence_id):
                self._broken.add(t.sequence_id)
                self.stats["skipped_saves"] += 1
                continue
            ops.append(StepOp.allocate(t.sequence_id, t.num_tokens))
            eligible.append((t, len(ops) - 1))
        if not ops:
            return
        try:
            results = s.step(ops, include_slot_mapping=True)
        except Exception as e:  # noqa: BLE001 - a copy that missed a save is never loaded
            for t, _ in eligible:
                self._broken.add(t.sequence_id)
                self.stats["skipped_saves"] += 1
            self._failed("saving a step's tokens", e)
            return
        for t, i in eligible:
            try:
                if results[i].error is not None:
                    raise results[i].error
                for layer in results[i].layers:
                    if not s.lease_ok:
                        raise s.status
                    self._write_to_pool(s.pool, layer.layer, t, layer.slot_mapping)
            except Exception as e:  # noqa: BLE001 - a copy that missed a save is never loaded
                self._broken.add(t.sequence_id)
                self.stats["skipped_saves"] += 1
                self._failed(f"saving {t.sequence_id}", e)
                continue
            self.stats["saved_tokens"] += t.num_tokens

    def _load(self, t: _Transfer) -> None:
        """Copies one scheduled load from the sidecar into vLLM's blocks, or reports its blocks
        as load errors."""
        s = self._usable_session()
        try:
            if s is None or not (t.remote or self._fresh(t.sequence_id)) or \
                    not self._finish_compression(s, t.sequence_id, wait=True):
                raise CacheManagerError(grpc.StatusCode.UNAVAILABLE,
                                        f"no whole sidecar copy of {t.sequence_id}")
            fetched = s.fetch(t.sequence_id)
            if len(fetched) != len(self._kv_caches):
                raise ValueError(f"the sidecar returned {len(fetched)} layers of "
                                 f"{t.sequence_id}, not {len(self._kv_caches)}")
            for f in fetched:
                rows = t.first_token + t.num_tokens
                if f.num_tokens < rows:
                    raise ValueError(f"the sidecar holds {f.num_tokens} tokens of "
                                     f"{t.sequence_id} in layer {f.layer}, not the {rows} to load")
                k, v = s.pool.read(f.layer, f.block_ids, rows)
                if not s.lease_ok:  # read from a revoked mapping: not the sidecar's rows
                    raise s.status
                kv = self._kv_caches[f.layer]
                blocks, offsets = self._slots(kv, t.block_ids, t.first_token, rows)
                self._layout.scatter(kv, int(self.config["head_dim"]), blocks, offsets,
                                     self._like(kv, k[t.first_token:rows]),
                                     self._like(kv, v[t.first_token:rows]))
        except Exception as e:  # noqa: BLE001 - whatever failed, vLLM recomputes these blocks
            # Blocks may be partly written: all of them are reported, none is trusted.
            first = t.first_token // self.block_size
            last = -(-(t.first_token + t.num_tokens) // self.block_size)
            self._load_errors.update(t.block_ids[first:last])
            self.stats["load_errors"] += 1
            self._failed(f"loading {t.sequence_id}", e)
            if t.remote:
                if s is not None:
                    self._free_scratch(s, t.sequence_id)
            else:
                self._broken.add(t.sequence_id)
            return
        self.stats["loaded_tokens"] += t.num_tokens
        if t.remote:  # loaded once: the prefill instance's copy has served its purpose
            self.stats["remote_loaded_tokens"] += t.num_tokens
            self._free_scratch(s, t.sequence_id)
            return
        self._park(s, t.sequence_id)  # back to the arena until the next preemption

    def _store_prefix(self, p: _PrefixTransfer) -> None:
        """Copies full blocks of a request from vLLM's cache into a scratch sidecar sequence,
        stores them under their hashes (the daemon keeps them after the sequence is freed) and
        frees the sequence."""
        s = self._usable_session()
        if s is None:
            self.stats["skipped_saves"] += 1
            return
        sequence_id = f"vllm-store-{p.request_id}-{p.first_block}"
        tokens = len(p.hashes) * self.block_size
        transfer = _Transfer(sequence_id, p.block_ids, p.first_block * self.block_size, tokens)
        try:
            alloc = s.allocate(sequence_id, tokens)
            for layer in range(s.model.num_layers):
                if not s.lease_ok:
                    raise s.status
                self._write_to_pool(s.pool, layer, transfer, alloc.layers[layer].slot_mapping)
            codebook = None
            if self.prefix_codebook is not None:  # K was rotated at the blocks' prompt positions
                codebook = dataclasses.replace(self.prefix_codebook,
                                               first_position=p.first_block * self.block_size)
            stored = s.store_prefix(sequence_id, p.hashes, codebook=codebook)
        except Exception as e:  # noqa: BLE001 - an unsaved block is a later miss
            self.stats["skipped_saves"] += 1
            self._failed(f"storing blocks of {p.request_id}", e)
        else:
            self.stats["prefix_stored_blocks"] += stored.stored
            self.stats["saved_tokens"] += tokens
        finally:
            self._free_scratch(s, sequence_id)

    def _load_prefix(self, p: _PrefixTransfer) -> None:
        """Loads stored blocks into the request's vLLM blocks; what the daemon cannot serve
        (evicted since the scheduler matched, corrupt, daemon gone) goes to
        get_block_ids_with_load_errors() from the first block not served."""
        s = self._usable_session()
        sequence_id = f"vllm-load-{p.request_id}"
        first_token = p.first_block * self.block_size
        served = 0
        try:
            if s is None:
                raise CacheManagerError(grpc.StatusCode.UNAVAILABLE, "cachemgrd is unavailable")
            loaded = s.load_prefix(sequence_id, p.hashes)
            self.stats["prefix_corrupt_blocks"] += loaded.corrupt_blocks
            rows = min(loaded.loaded_blocks * self.block_size, p.num_tokens)
            if rows > 0:
                for table in loaded.sequence.layers:
                    k, v = s.pool.read(table.layer, table.block_ids, rows)
                    if not s.lease_ok:  # read from a revoked mapping: not the sidecar's rows
                        raise s.status
                    kv = self._kv_caches[table.layer]
                    blocks, offsets = self._slots(kv, p.block_ids, first_token, first_token + rows)
                    self._layout.scatter(kv, int(self.config["head_dim"]), blocks, offsets,
                                         self._like(kv, k), self._like(kv, v))
            served = rows
            if rows < p.num_tokens:
                raise CacheManagerError(
                    grpc.StatusCode.NOT_FOUND,
                    f"the prefix store served {loaded.loaded_blocks} of {len(p.hashes)} blocks "
                    f"({loaded.corrupt_blocks} corrupt)")
        except Exception as e:  # noqa: BLE001 - whatever failed, vLLM recomputes these blocks
            first = (first_token + served) // self.block_size
            last = -(-(first_token + p.num_tokens) // self.block_size)
            self._load_errors.update(p.block_ids[first:last])
            self.stats["load_errors"] += 1
            self._failed(f"loading the stored prefix of {p.request_id}", e)
        finally:
            if s is not None:
                self._free_scratch(s, sequence_id)
        self.stats["loaded_tokens"] += served
        self.stats["prefix_hit_tokens"] += served

    def _free_scratch(self, s: Session, sequence_id: str) -> None:
        try:
            if s.lease_ok:
                s.free(sequence_id)
        except CacheManagerError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:  # nothing was created
                self._sidecar_failed(f"freeing {sequence_id}", e)

    def _park(self, s: Session, sequence_id: str) -> None:
        try:
            s.park(sequence_id)
        except CacheManagerError as e:
            self._broken.add(sequence_id)
            self._sidecar_failed(f"parking {sequence_id}", e)
            return
        self.stats["parks"] += 1

    def _finish_compression(self, s: Session, sequence_id: str, wait: bool) -> bool:
        """Applies the background compression of `sequence_id` if one is pending: with `wait`
        waits for the daemon's work, without it leaves a compression still working pending.
        Returns False when the copy cannot be used (the compression failed: it is broken)."""
        if sequence_id not in self._compressing:
            return True
        start = time.perf_counter()
        try:
            result = s.finish_compress(sequence_id, wait=wait)
        except CacheManagerError as e:
            self._compressing.discard(sequence_id)
            self._broken.add(sequence_id)
            self._sidecar_failed(f"compressing {sequence_id}", e)
            return False
        finally:
            if wait:
                self.stats["compress_wait_us"] += int(1e6 * (time.perf_counter() - start))
        if result.pending:
            return True
        self._compressing.discard(sequence_id)
        self.stats["bytes_before"] += result.bytes_before
        self.stats["bytes_after"] += result.bytes_after
        return True

    def _poll_compressions(self) -> None:
        """Applies the background compressions whose work is done (none is waited for)."""
        if not self._compressing:
            return
        s = self._usable_session()
        if s is None:
            return
        for sequence_id in list(self._compressing):
            self._finish_compression(s, sequence_id, wait=False)

    def start_load_kv(self, forward_context=None, **kwargs) -> None:
        """Copies every scheduled load from the sidecar into vLLM's blocks (synchronously);
        loads that fail are reported by get_block_ids_with_load_errors()."""
        meta = self._connector_metadata
        if meta is None or not (meta.loads or meta.prefix_loads or meta.remote_frees):
            return
        # Moved-in prompts the scheduler will not load (vLLM had them already): freed.
        for sequence_id in meta.remote_frees:
            if self.session is not None:
                self._free_scratch(self.session, sequence_id)
        start = time.perf_counter()
        for t in meta.loads:
            self._load(t)
        for p in meta.prefix_loads:
            self._load_prefix(p)
        self.stats["load_us"] += int(1e6 * (time.perf_counter() - start))

    def get_block_ids_with_load_errors(self) -> Set[int]:
        """vLLM block ids whose load failed since the last call (vLLM recomputes them)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata=None, **kwargs) -> None:
        """Saving happens once per step for all layers in wait_for_save (the sidecar allocates
        a token in every layer at once); vLLM has written this layer by now."""
        return

    def wait_for_save(self) -> None:
        """Saves this step's prefill tokens, and compresses the prompts that completed."""
        self._poll_compressions()
        meta = self._connector_metadata
        if meta is None or not (meta.prefix_saves or meta.saves or meta.compress_after_save):
            return
        start = time.perf_counter()
        try:
            self._save_step(meta)
        finally:
            self.stats["save_us"] += int(1e6 * (time.perf_counter() - start))

    def _save_step(self, meta: CacheManagerConnectorMetadata) -> None:
        for p in meta.prefix_saves:
            self._store_prefix(p)
        self._save_all(meta.saves)
        for sequence_id in meta.compress_after_save:
            s = self._usable_session()
            if s is None or not self._fresh(sequence_id):
                self._broken.add(sequence_id)
                continue
            try:
                result = s.compress(sequence_id, self.policy, reserve_ratio=self.reserve_ratio,
                                    byte_ratio=self.byte_ratio,
                                    background=self.background_compress)
            except CacheManagerError as e:
                self._broken.add(sequence_id)
                self._sidecar_failed(f"compressing {sequence_id}", e)
                continue
            self.stats["compressions"] += 1
            if result.pending:
                self._compressing.add(sequence_id)
            else:
                self.stats["bytes_before"] += result.bytes_before
                self.stats["bytes_after"] += result.bytes_after
        for send in meta.remote_sends:
            self._send_remote(send)

    def _send_remote(self, send: _RemoteSend) -> None:
        """kv_producer: moves a saved (and compressed) prompt into the decode worker's session
        on its daemon, in the form the sidecar holds it. A failure is counted and logged; the
        decode instance then finds nothing to load and recomputes the prompt."""
        s = self._usable_session()
        try:
            if s is None or not self._fresh(send.sequence_id) or \
                    not self._finish_compression(s, send.sequence_id, wait=True):
                raise CacheManagerError(grpc.StatusCode.UNAVAILABLE,
                                        f"no whole sidecar copy of {send.sequence_id} to send")
            result = s.transfer_sequence(
                send.sequence_id, send.peer, send.session_token, send.transfer_id,
                destination_sequence_id=send.destination_sequence_id, move=True,
                timeout_ms=int(self.config.get("transfer_timeout_ms", 30000)))
        except Exception as e:  # noqa: BLE001 - the decode side recomputes what never came
            self.stats["remote_send_failures"] += 1
            self._failed(f"moving {send.sequence_id} to {send.peer}", e)
            return
        self.stats["remote_sends"] += 1
        self.stats["remote_send_bytes"] += result.payload_bytes
        # Moved: this session no longer holds it.
        self._generation_of.pop(send.sequence_id, None)

    def handle_preemptions(self, kv_connector_metadata=None) -> None:
        """Before vLLM reuses a preempted request's blocks: append its decoded tokens to the
        sidecar copy and park it."""
        meta = kv_connector_metadata or self._connector_metadata
        if meta is None:
            return
        for sequence_id in meta.dropped:
            self._free(sequence_id)
        for t in meta.preempted:
            s = self._usable_session()
            if s is None or not self._fresh(t.sequence_id) or \
                    not self._finish_compression(s, t.sequence_id, wait=True):
                self._broken.add(t.sequence_id)
                continue
            if t.num_tokens > 0:
                try:
                    s.fetch(t.sequence_id)
                except CacheManagerError as e:
                    self._broken.add(t.sequence_id)
                    self._sidecar_failed(f"fetching {t.sequence_id}", e)
                    continue
                self._save(t)
                if not self._fresh(t.sequence_id):
                    continue
            self._park(s, t.sequence_id)

    def _free(self, sequence_id: str) -> None:
        """Frees the sidecar copy if the current session holds one; forgets the sequence."""
        held = self._held_here(sequence_id)
        self._generation_of.pop(sequence_id, None)
        self._broken.discard(sequence_id)
        self._compressing.discard(sequence_id)  # Free ends a background compression too
        s = self.session
        if not held or not s.lease_ok:
            return
        try:
            s.free(sequence_id)
        except CacheManagerError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:  # never saved (finished in its prefill)
                self._sidecar_failed(f"freeing {sequence_id}", e)

    def get_finished(self, finished_req_ids: Set[str]) -> Tuple[Optional[Set[str]],
                                                               Optional[Set[str]]]:
        """Frees the sidecar sequences of the requests vLLM finished; nothing is asynchronous,
        so no request is reported back."""
        for rid in finished_req_ids:
            self._free(_sequence_id(rid))
        return None, None

    def shutdown(self) -> None:
        for attr in ("session", "_scheduler_session"):
            session = getattr(self, attr)
            if session is not None:
                session.detach()
                setattr(self, attr, None)
        if self._kv_cache_arena is not None:  # kv_mem_pool: vLLM's last forward is done
            self._kv_cache_arena.close()
            self._kv_cache_arena = None

    # ---- scheduler side ----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        """Tokens the sidecar can load beyond what vLLM computed (0 unless the request was
        saved and every layer kept all its tokens). Side-effect free."""
        remote = self._remote_prefill_tokens(request, num_computed_tokens)
        if remote is not None:
            self._remote_local[request.request_id] = num_computed_tokens
            return remote, False
        if self.prefix_store:
            return self._prefix_matched_tokens(request, num_computed_tokens), False
        rid = request.request_id
        held = self._saved.get(rid, 0)
        if not self._loadable.get(rid, False) or held <= num_computed_tokens:
            return 0, False
        if not self._sidecar_up():
            return 0, False  # vLLM recomputes
        # vLLM computes at least the last token itself (it needs its logits).
        matched = min(held, request.num_tokens - 1) - num_computed_tokens
        return max(0, matched), False

    def _remote_prefill_tokens(self, request, num_computed_tokens: int) -> Optional[int]:
        """kv_consumer: for a request whose prompt a prefill instance moved here
        (kv_transfer_params do_remote_prefill with cachemgr_sequence), the prompt tokens past
        num_computed_tokens to load from it; None for other requests. The KV is taken on the
        producer's word: if it never came, the load fails and vLLM recomputes."""
        params = _transfer_params(request)
        if not (self.consumer and params.get("do_remote_prefill") and
                params.get("cachemgr_sequence")):
            return None
        prompt = len(getattr(request, "prompt_token_ids", None) or ())
        held = min(int(params.get("remote_num_tokens", prompt)), prompt)
        # vLLM computes at least the last token itself (it needs its logits).
        return max(0, min(held, request.num_tokens - 1) - num_computed_tokens)

    def _prefix_matched_tokens(self, request, num_computed_tokens: int) -> int:
        """Tokens past num_computed_tokens whose blocks the prefix store holds (MatchPrefix on
        the request's block hashes from its first block); 0 when the sidecar is down."""
        rid = request.request_id
        hashes = list(getattr(request, "block_hashes", None) or ())
        self._matched[rid] = (0, num_computed_tokens)
        if not hashes or not self._sidecar_up():
            return 0
        s = self._scheduler_usable_session()
        if s is None:
            return 0
        try:
            matched = s.match_prefix(hashes)
        except CacheManagerError as e:
            self._sidecar_failed("matching a prefix", e)
            return 0
        self._matched[rid] = (matched, num_computed_tokens)
        # vLLM computes at least the last token itself (it needs its logits).
        end = min(matched * self.block_size, request.num_tokens - 1)
        return max(0, end - num_computed_tokens)

    def _scheduler_usable_session(self) -> Optional[Session]:
        """The scheduler's own session (MatchPrefix only: it maps nothing it uses), attached or
        re-attached at most once per reconnect_interval."""
        s = self._scheduler_session
        if s is not None and s.lease_ok:
            return s
        now = time.monotonic()
        if now < self._scheduler_retry_at:
            return None
        self._scheduler_retry_at = now + self.reconnect_interval
        try:
            if s is None:
                self._scheduler_session = Session.attach(
                    self.config["socket"],
                    self.config.get("client_name", "vllm") + "-scheduler", self._model(),
                    num_blocks=int(self.config.get("num_blocks", 0)))
            else:
                s.reattach()
            return self._scheduler_session
        except (CacheManagerError, ValueError) as e:
            if isinstance(e, CacheManagerError):
                self._sidecar_failed("attaching the scheduler", e)
            return None

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        rid = request.request_id
        block_ids = list(blocks.get_block_ids()[0]) if blocks is not None else []
        if block_ids:
            self._block_ids[rid] = block_ids
        params = _transfer_params(request)
        if self.producer and params.get("do_remote_decode"):
            self._plan_remote_decode(request, params)
        local = self._remote_local.pop(rid, None)
        if local is not None and self._remote_prefill_tokens(request, local) is not None:
            sequence_id = str(params["cachemgr_sequence"])
            # Loaded at most once (a preemption later recomputes or reloads the local copy).
            params["do_remote_prefill"] = False
            if num_external_tokens > 0:
                self._pending.loads.append(_Transfer(
                    sequence_id, list(self._block_ids[rid]), local, num_external_tokens,
                    request_id=rid, remote=True))
                self._computed[rid] = local + num_external_tokens
            else:
                self._pending.remote_frees.append(sequence_id)
            return
        if self.prefix_store:
            self._requests[rid] = request
            # The local prefix cache's hits are not in request.num_computed_tokens yet.
            matched, local = self._matched.pop(rid, (0, request.num_computed_tokens))
            # Blocks the store holds need no save (the daemon dedupes the rest anyway).
            self._stored_blocks[rid] = matched
            if num_external_tokens > 0:
                first_block = local // self.block_size
                end = local + num_external_tokens
                last_block = -(-end // self.block_size)
                hashes = list(request.block_hashes[first_block:last_block])
                self._pending.prefix_loads.append(_PrefixTransfer(
                    rid, list(self._block_ids[rid]), first_block, hashes,
                    end - first_block * self.block_size))
            return
        if num_external_tokens > 0:
            self._pending.loads.append(_Transfer(_sequence_id(rid), list(self._block_ids[rid]),
                                                 request.num_computed_tokens,
                                                 num_external_tokens))
            self._computed[rid] = request.num_computed_tokens + num_external_tokens

    def _plan_remote_decode(self, request, params: Dict[str, Any]) -> None:
        """kv_producer: remembers where the request's prompt goes once saved (the proxy's
        kv_transfer_params: do_remote_decode, cachemgr_peer, cachemgr_session_token,
        cachemgr_sequence, optional cachemgr_transfer_id); a request missing one is prefilled
        as usual and its decode recomputes."""
        rid = request.request_id
        missing = [k for k in ("cachemgr_peer", "cachemgr_session_token", "cachemgr_sequence")
                   if not params.get(k)]
        if missing:
            _log.warning("cachemgr connector: request %s asks for remote decode without "
                         "kv_transfer_params %s; its KV stays here", rid, ", ".join(missing))
            return
        sequence = str(params["cachemgr_sequence"])
        self._remote_decode[rid] = _RemoteSend(
            _sequence_id(rid), str(params["cachemgr_peer"]), str(params["cachemgr_session_token"]),
            sequence, str(params.get("cachemgr_transfer_id") or sequence))
        self._prompt_len[rid] = len(getattr(request, "prompt_token_ids", None) or ())

    def build_connector_meta(self, scheduler_output) -> CacheManagerConnectorMetadata:
        if self.prefix_store:
            return self._build_prefix_meta(scheduler_output)
        meta, self._pending = self._pending, CacheManagerConnectorMetadata()
        # Preempted requests first: their blocks still hold what they computed.
        for rid in sorted(getattr(scheduler_output, "preempted_req_ids", None) or ()):
            held, computed = self._saved.get(rid, 0), self._computed.get(rid, 0)
            if rid not in self._compressed:
                if held > 0:
                    meta.dropped.append(_sequence_id(rid))
                self._saved[rid] = 0
            elif held > 0:
                meta.preempted.append(_Transfer(_sequence_id(rid),
                                                list(self._block_ids.get(rid, [])), held,
                                                max(0, computed - held)))
                self._saved[rid] = max(held, computed)
            self._block_ids.pop(rid, None)
            self._computed[rid] = 0
        scheduled = getattr(scheduler_output, "num_scheduled_tokens", {}) or {}
        for new in getattr(scheduler_output, "scheduled_new_reqs", []) or []:
            rid = new.req_id
            self._block_ids[rid] = list(new.block_ids[0])
            self._prompt_len[rid] = len(new.prompt_token_ids)
            self._step(meta, rid, new.num_computed_tokens, scheduled.get(rid, 0))
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cached is not None:
            resumed = set(getattr(cached, "resumed_req_ids", None) or ())
            flags = getattr(cached, "resumed_from_preemption", None)
            for i, rid in enumerate(cached.req_ids):
                extra = cached.new_block_ids[i]
                if rid in resumed or (flags is not None and flags[i]):
                    self._block_ids[rid] = list(extra[0]) if extra is not None else []
                elif extra is not None:
                    self._block_ids[rid] = self._block_ids.get(rid, []) + list(extra[0])
                self._step(meta, rid, cached.num_computed_tokens[i], scheduled.get(rid, 0))
        meta.finished = sorted(getattr(scheduler_output, "finished_req_ids", None) or ())
        return meta

    def _build_prefix_meta(self, scheduler_output) -> CacheManagerConnectorMetadata:
        """Prefix store: every block that is full of computed tokens after this step (prompt
        and output alike) is stored once, under the request's hash of it."""
        meta, self._pending = self._pending, CacheManagerConnectorMetadata()
        for rid in getattr(scheduler_output, "preempted_req_ids", None) or ():
            self._block_ids.pop(rid, None)  # its blocks are vLLM's again; resumption re-matches
        scheduled = getattr(scheduler_output, "num_scheduled_tokens", {}) or {}
        steps = [(new.req_id, list(new.block_ids[0]), new.num_computed_tokens)
                 for new in getattr(scheduler_output, "scheduled_new_reqs", []) or []]
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cached is not None:
            resumed = set(getattr(cached, "resumed_req_ids", None) or ())
            for i, rid in enumerate(cached.req_ids):
                extra = cached.new_block_ids[i]
                extra = list(extra[0]) if extra is not None else []
                known = [] if rid in resumed else self._block_ids.get(rid, [])
                steps.append((rid, known + extra, cached.num_computed_tokens[i]))
        for rid, block_ids, computed in steps:
            self._block_ids[rid] = block_ids
            if rid in self._remote_decode:  # its prompt is saved as a sequence, then moved
                self._step(meta, rid, computed, scheduled.get(rid, 0))
            request = self._requests.get(rid)
            if request is None:
                continue
            full = min((computed + scheduled.get(rid, 0)) // self.block_size,
                       len(request.block_hashes), len(block_ids))
            stored = self._stored_blocks.get(rid, 0)
            if full > stored:
                meta.prefix_saves.append(_PrefixTransfer(
                    rid, block_ids, stored, list(request.block_hashes[stored:full])))
                self._stored_blocks[rid] = full
        return meta

    def _step(self, meta, rid: str, computed: int, scheduled: int) -> None:
        """Saves the prompt tokens computed this step; compresses once the prompt is saved."""
        self._computed[rid] = computed + scheduled
        prompt = self._prompt_len.get(rid, 0)
        held = self._saved.get(rid, 0)
        end = min(prompt, computed + scheduled)
        if end > held and held == computed:
            meta.saves.append(_Transfer(_sequence_id(rid), list(self._block_ids[rid]), held,
                                        end - held))
            self._saved[rid] = end
            if end == prompt:
                meta.compress_after_save.append(_sequence_id(rid))
                self._compressed.add(rid)
                if rid in self._remote_decode:
                    meta.remote_sends.append(self._remote_decode[rid])
                # Only a sequence that kept every token can go back into vLLM's blocks.
                self._loadable[rid] = self.policy.preset in ("codebook", "fullkv") and (
                    self.byte_ratio is None and self.reserve_ratio == 1.0)

    def _sidecar_up(self) -> bool:
        """Whether cachemgrd's Unix socket accepts connections (a connect, at most once per
        reconnect_interval; TCP targets count as up). The worker's load errors catch what a
        probe cannot, such as a restart between probes or a daemon that hangs."""
        path = str(self.config["socket"])
        if not path.startswith("/"):
            return True
        now = time.monotonic()
        if now - self._probe_at < self.reconnect_interval:
            return self._probe_up
        self._probe_at = now
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.1)
            try:
                probe.connect(path)
                self._probe_up = True
            except OSError:
                self._probe_up = False
        return self._probe_up

    def update_connector_output(self, connector_output) -> None:
        """Scheduler side: a request whose blocks failed to load (KVConnectorOutput's
        invalid_block_ids) is recomputed by vLLM from its first failed block, which for the
        connector's loads is the start: it is not offered from the sidecar's old copy again,
        and its recomputed prompt is saved afresh (into a restarted daemon, say)."""
        invalid = set(getattr(connector_output, "invalid_block_ids", None) or ())
        if not invalid:
            return
        if self.prefix_store:
            # vLLM recomputes from the first failed block: store the recomputed blocks again.
            for rid, blocks in self._block_ids.items():
                bad = [i for i, b in enumerate(blocks) if b in invalid]
                if bad:
                    self._stored_blocks[rid] = min(self._stored_blocks.get(rid, 0), bad[0])
            return
        for rid, blocks in self._block_ids.items():
            if invalid.intersection(blocks):
                self._loadable[rid] = False
                self._saved[rid] = 0
                self._compressed.discard(rid)

    def request_finished(self, request, block_ids) -> Tuple[bool, Optional[dict]]:
        """Forgets the request (the worker frees its sidecar sequence when get_finished hears
        of it); vLLM may free the blocks at once."""
        rid = request.request_id
        sent = self._remote_decode.pop(rid, None)
        held = self._saved.get(rid, 0)
        for table in (self._block_ids, self._saved, self._loadable, self._prompt_len,
                      self._computed, self._requests, self._stored_blocks, self._matched,
                      self._remote_local):
            table.pop(rid, None)
        self._compressed.discard(rid)
        if sent is not None and held > 0:
            # For the proxy to pass to the decode instance (kv_consumer).
            return False, {"do_remote_prefill": True,
                           "cachemgr_sequence": sent.destination_sequence_id,
                           "remote_num_tokens": held}
        return False, None
