"""Session: one attached client of cachemgrd.

    with cachemgr.Session.attach("/run/cachemgr/cachemgr.sock", "worker-0", model) as s:
        alloc = s.allocate("req-1", 48)
        s.pool.write(0, alloc.layers[0].slot_mapping, k, v)
        s.compress("req-1", cachemgr.Policy("spindlekv"), byte_ratio=0.3, queries=window_q)

A background thread heartbeats at the interval the daemon asks for (the lease ends, and every
block the client held returns to the pool, when heartbeats stop). Every failed call raises
CacheManagerError carrying the daemon's status code and message. Thread-safe: calls may come
from several threads."""

import os
import threading
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import grpc
import numpy as np

from . import convert
from .errors import CacheManagerError, from_rpc_error
from .pool import HostPool
from .share_channel import fetch_shared_fds
from .types import (Allocation, CompressResult, FetchedLayer, ModelSpec, ParkedLayer, Policy,
                    SequenceInfo, SequenceSummary, Stats)
from .v1 import cachemgr_pb2 as pb
from .v1 import cachemgr_pb2_grpc as pb_grpc

CALL_TIMEOUT = 10.0
HEAVY_CALL_TIMEOUT = 600.0  # Compress, Fetch, Park: CPU work proportional to the sequence
OPERATOR_METADATA_KEY = "x-cachemgr-operator"


@dataclass
class TlsOptions:
    """TLS for a TCP target: `ca_file` verifies the daemon's certificate (None: the system's
    roots); `cert_file` and `key_file` are this client's certificate for mutual TLS."""

    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None


def _read(path: Optional[str]) -> Optional[bytes]:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def channel(target: str, tls: Optional[TlsOptions] = None) -> grpc.Channel:
    """A channel to a Unix socket path (or "unix:..."), or "host:port" for TCP (with `tls`, over
    TLS)."""
    if target.startswith("/"):
        target = "unix:" + target
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=_read(tls.ca_file),
                                               private_key=_read(tls.key_file),
                                               certificate_chain=_read(tls.cert_file))
    return grpc.secure_channel(target, credentials, options=options)


def read_operator_token(target: str, operator_token_file: Optional[str]) -> Optional[str]:
    """The operator credential: the token in `operator_token_file`, or, when that is None and
    `target` is a socket path, in the daemon's default `<socket>.operator` if this process may
    read it. "" means none."""
    if operator_token_file == "":
        return None
    path = operator_token_file
    if path is None:
        if not target.startswith(("/", "unix:")):
            return None
        path = target[len("unix:"):] if target.startswith("unix:") else target
        path += ".operator"
        try:
            with open(path) as f:
                return f.read().strip() or None
        except OSError:
            return None  # not an operator: the daemon shows this user's view
    with open(path) as f:
        return f.read().strip()


class _Caller:
    def __init__(self, target: str, bearer_token: Optional[str],
                 tls: Optional[TlsOptions] = None, operator_token: Optional[str] = None):
        self.channel = channel(target, tls)
        self.stub = pb_grpc.CacheManagerStub(self.channel)
        metadata = []
        if bearer_token:
            metadata.append(("authorization", f"Bearer {bearer_token}"))
        if operator_token:
            metadata.append((OPERATOR_METADATA_KEY, operator_token))
        self.metadata = metadata or None

    def __call__(self, method: str, request, timeout: float = CALL_TIMEOUT):
        try:
            return getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def close(self):
        self.channel.close()


class Session:
    """See the module docstring. Create with Session.attach()."""

    def __init__(self, caller: _Caller, response, model: ModelSpec, heartbeat: bool):
        self._call = caller
        self._token = response.session_token
        self.client_id = response.client_id
        pool = response.pool
        self.pool_id = pool.pool_id
        self.model = convert.model_from_proto(pool.model)
        self.num_blocks = pool.num_blocks
        self.heartbeat_interval = (response.heartbeat_interval_ms or 1000) / 1000.0
        self.lease_timeout = response.lease_timeout_ms / 1000.0
        self.backend = pb.Backend.Name(pool.backend)
        fds = fetch_shared_fds(pool.share_socket_path, self._token)
        regions = len(pool.regions)
        # memfd and VMM pools pass one descriptor per region, legacy CUDA IPC none; the input
        # buffer's memfd comes last.
        region_fds = 0 if pool.share_method == pb.SHARE_METHOD_CUDA_IPC_HANDLE else regions
        if len(fds) != region_fds + 1 or pool.input_buffer_region_index != region_fds:
            for fd in fds:
                os.close(fd)
            raise CacheManagerError(grpc.StatusCode.DATA_LOSS,
                                    f"share channel passed {len(fds)} descriptors for "
                                    f"{region_fds} region descriptors and the input buffer")
        places = [(l.region_index, l.offset, l.bytes) for l in pool.layers]
        if pool.share_method == pb.SHARE_METHOD_MEMFD:
            self.pool = HostPool(self.model, pool.num_blocks, fds[:regions],
                                 [r.bytes for r in pool.regions], places)
        elif pool.share_method in (pb.SHARE_METHOD_CUDA_VMM_FD, pb.SHARE_METHOD_CUDA_IPC_HANDLE):
            from .device_pool import CudaError, DevicePool
            vmm = pool.share_method == pb.SHARE_METHOD_CUDA_VMM_FD
            try:
                self.pool = DevicePool(
                    self.model, pool.num_blocks, pool.device, "vmm_fd" if vmm else "ipc_handle",
                    [(fds[i] if vmm else None, r.bytes, r.cuda_ipc_handle)
                     for i, r in enumerate(pool.regions)], places)
            except CudaError as e:
                os.close(fds[region_fds])
                raise CacheManagerError(grpc.StatusCode.FAILED_PRECONDITION,
                                        f"opening the CUDA pool {pool.pool_id}: {e}") from e
        else:
            for fd in fds:
                os.close(fd)
            raise CacheManagerError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"the pool is shared by {pb.ShareMethod.Name(pool.share_method)}, which this "
                "client does not know")
        regions = region_fds
        import mmap
        try:
            self._input_map = mmap.mmap(fds[regions], pool.input_buffer_bytes, mmap.MAP_SHARED,
                                        mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fds[regions])
        self.input_buffer = np.frombuffer(self._input_map, dtype=np.float32)
        self._stop = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._heartbeat_thread = None
        if heartbeat:
            self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                                      name=f"cachemgr-heartbeat-{self.client_id}")
            self._heartbeat_thread.start()

    # ---- lifecycle --------------------------------------------------------------------------

    @classmethod
    def attach(cls, target: str, client_name: str, model: ModelSpec, num_blocks: int = 0,
               input_buffer_bytes: int = 0, heartbeat: bool = True,
               bearer_token: Optional[str] = None,
               tls: Optional[TlsOptions] = None) -> "Session":
        """Attaches to the daemon at `target` (a Unix socket path, or host:port with
        `bearer_token` and `tls`), creating the model's pool with `num_blocks` blocks per layer
        if it is the first client of this user (0: the daemon decides), and maps the pool."""
        caller = _Caller(target, bearer_token, tls)
        response = None
        try:
            response = caller("Attach", pb.AttachRequest(
                client_name=client_name, model=convert.model_to_proto(model),
                num_blocks=num_blocks, input_buffer_bytes=input_buffer_bytes))
            return cls(caller, response, model, heartbeat)
        except BaseException:
            if response is not None:  # attached but could not map: give the session back
                try:
                    caller("Detach", pb.DetachRequest(session_token=response.session_token))
                except Exception:  # noqa: BLE001 - the lease expires anyway
                    pass
            caller.close()
            raise

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def detach(self) -> Optional[int]:
        """Ends the session (the daemon frees every sequence of it); returns the number of
        sequences freed, or None if already detached. Idempotent."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
        self._stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join()
        try:
            response = self._call("Detach", pb.DetachRequest(session_token=self._token))
            freed = response.sequences_freed
        except CacheManagerError:
            freed = None
        self.input_buffer = None
        try:
            self._input_map.close()
        except BufferError:
            pass
        self.pool.close()
        self._call.close()
        return freed

    def heartbeat(self) -> float:
        """Renews the lease; returns the seconds left on it."""
        return self._call("Heartbeat",
                          pb.HeartbeatRequest(session_token=self._token)).lease_remaining_ms / 1e3

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                self.heartbeat()
            except CacheManagerError:
                pass  # the next beat retries; an expired lease surfaces on the next call

    # ---- sequences --------------------------------------------------------------------------

    def allocate(self, sequence_id: str, num_new_tokens: int) -> Allocation:
        return convert.allocation_from_proto(self._call("Allocate", pb.AllocateRequest(
            session_token=self._token, sequence_id=sequence_id, num_new_tokens=num_new_tokens)))

    def free(self, sequence_id: str) -> int:
        """Returns the blocks whose last reference went away."""
        return self._call("Free", pb.FreeRequest(session_token=self._token,
                                                 sequence_id=sequence_id)).blocks_released

    def fork(self, parent_sequence_id: str, child_sequence_id: str) -> SequenceInfo:
        return convert.sequence_from_proto(self._call("Fork", pb.ForkRequest(
            session_token=self._token, parent_sequence_id=parent_sequence_id,
            child_sequence_id=child_sequence_id)).child)

    def get_sequence(self, sequence_id: str, include_kv_digest: bool = False) -> SequenceInfo:
        return convert.sequence_from_proto(self._call("GetSequence", pb.GetSequenceRequest(
            session_token=self._token, sequence_id=sequence_id,
            include_kv_digest=include_kv_digest)).sequence)

    def list_sequences(self) -> List[SequenceSummary]:
        return convert.summaries_from_proto(self._call("ListSequences", pb.ListSequencesRequest(
            session_token=self._token)))

    # ---- compression ------------------------------------------------------------------------

    def compress(self, sequence_id: str, policy: Policy = Policy(),
                 reserve_ratio: Optional[float] = None, byte_ratio: Optional[float] = None,
                 queries: Optional[np.ndarray] = None,
                 scores: Optional[np.ndarray] = None) -> CompressResult:
        """Compresses a sequence in place. Exactly one of `reserve_ratio` (the paper's r) and
        `byte_ratio` (honest bytes held / full bytes, met within 1%). Inputs, written into the
        input buffer the daemon lent: `queries` float32 [num_layers, num_queries, num_q_heads,
        head_dim] (post-RoPE observation-window queries) or `scores` float32 [num_layers,
        num_q_heads, num_tokens]; neither for policies that need none."""
        if (reserve_ratio is None) == (byte_ratio is None):
            raise ValueError("give exactly one of reserve_ratio and byte_ratio")
        if queries is not None and scores is not None:
            raise ValueError("give queries or scores, not both")
        request = pb.CompressRequest(session_token=self._token, sequence_id=sequence_id,
                                     policy=convert.policy_to_proto(policy),
                                     cuda_ipc_event_handle=self._write_event_handle())
        if reserve_ratio is not None:
            request.reserve_ratio = reserve_ratio
        else:
            request.byte_ratio = byte_ratio
        request.input = pb.INPUT_SOURCE_NONE
        for array, source in ((queries, pb.INPUT_SOURCE_WINDOW_QUERIES),
                              (scores, pb.INPUT_SOURCE_SCORES)):
            if array is None:
                continue
            flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
            if flat.size > self.input_buffer.size:
                raise CacheManagerError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{'queries' if source == pb.INPUT_SOURCE_WINDOW_QUERIES else 'scores'} of "
                    f"{flat.size * 4} bytes exceed the {self.input_buffer.size * 4}-byte input "
                    "buffer (attach with a larger input_buffer_bytes)")
            self.input_buffer[:flat.size] = flat
            request.input = source
            if source == pb.INPUT_SOURCE_WINDOW_QUERIES:
                if array.ndim != 4:
                    raise ValueError("queries must be [num_layers, num_queries, num_q_heads, "
                                     "head_dim]")
                request.num_queries = array.shape[1]
        return convert.compress_result_from_proto(
            self._call("Compress", request, timeout=HEAVY_CALL_TIMEOUT), self.model)

    def fetch(self, sequence_id: str, layers: Iterable[int] = ()) -> List[FetchedLayer]:
        """Makes layers (default all) resident: codebook layers are reconstructed into new
        blocks."""
        response = self._call("Fetch", pb.FetchRequest(
            session_token=self._token, sequence_id=sequence_id, layers=list(layers)),
            timeout=HEAVY_CALL_TIMEOUT)
        return convert.fetched_from_proto(response, self.model)

    def park(self, sequence_id: str, layers: Iterable[int] = ()) -> List[ParkedLayer]:
        """Returns fetched codebook layers (default all) to the daemon's arena, coding the rows
        appended since Fetch; their blocks are released."""
        response = self._call("Park", pb.ParkRequest(
            session_token=self._token, sequence_id=sequence_id, layers=list(layers),
            cuda_ipc_event_handle=self._write_event_handle()), timeout=HEAVY_CALL_TIMEOUT)
        return convert.parked_from_proto(response)

    def record_kv_writes(self, stream: int = 0) -> None:
        """CUDA pools: records the session's interprocess write event on `stream` (an int
        CUstream, e.g. torch.cuda.current_stream().cuda_stream; 0: the legacy default stream)
        after the KV writes enqueued there, so that later compress() and park() calls need no
        synchronisation first: the daemon waits for the event before it reads the pool.
        FAILED_PRECONDITION for a pool in host memory (writes there are complete when the
        stores return)."""
        if not self.pool.on_device:
            raise CacheManagerError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "record_kv_writes is for CUDA pools; this pool is in host memory, where writes "
                "are complete when the stores return")
        self.pool.record_kv_writes(stream)

    def _write_event_handle(self) -> bytes:
        return getattr(self.pool, "write_event_handle", b"")


def stats(target: str, bearer_token: Optional[str] = None,
          operator_token_file: Optional[str] = None,
          tls: Optional[TlsOptions] = None) -> Stats:
    """Pool occupancy, clients and sequences (no session needed): daemon-wide with the operator
    credential (see read_operator_token), otherwise only this user's."""
    caller = _Caller(target, bearer_token, tls, read_operator_token(target, operator_token_file))
    try:
        return convert.stats_from_proto(caller("Stats", pb.StatsRequest()))
    finally:
        caller.close()


def list_all_sequences(target: str, bearer_token: Optional[str] = None,
                       operator_token_file: Optional[str] = None,
                       tls: Optional[TlsOptions] = None) -> List[SequenceSummary]:
    """Every client's sequences with the operator credential, otherwise this user's."""
    caller = _Caller(target, bearer_token, tls, read_operator_token(target, operator_token_file))
    try:
        return convert.summaries_from_proto(caller("ListSequences", pb.ListSequencesRequest()))
    finally:
        caller.close()
