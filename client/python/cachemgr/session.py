"""Session: one attached client of cachemgrd.

    with cachemgr.Session.attach("/run/cachemgr/cachemgr.sock", "worker-0", model) as s:
        alloc = s.allocate("req-1", 48)
        if s.lease_ok:                                   # before each batch of writes
            s.pool.write(0, alloc.layers[0].slot_mapping, k, v)
        s.compress("req-1", cachemgr.Policy("spindlekv"), byte_ratio=0.3, queries=window_q)

A background thread heartbeats at the interval the daemon asks for (the lease ends, and every
block the client held returns to the pool, when heartbeats stop). Every failed call raises
CacheManagerError carrying the daemon's status code and message. Thread-safe: calls may come
from several threads.

Lease loss and daemon restarts. The client keeps a local lease deadline, renewed by every call
that reached the daemon (send time + lease timeout - a margin, on CLOCK_BOOTTIME: never later
than the daemon's own deadline). When it passes without renewal, or the daemon says it no longer
knows the session (its lease expired, or the token is from an earlier daemon start), the session
is *lost*: the pool mapping is revoked first (the numpy views now reach private memory, never
the pool), then every call raises `session.status` (ABORTED "lease expired at ...; the daemon
reclaimed this client's blocks", or UNAVAILABLE when the daemon was unreachable), `lease_ok` is
False, and `on_event` hears SessionEvent("lost", ...). The heartbeat thread does not swallow
errors: a definitive answer (NOT_FOUND, an earlier boot) ends the session at once, and a
transport failure is named in the error the session raises if its lease runs out.
While the daemon is down calls fail promptly with UNAVAILABLE. A lost session's sequences are
gone. With auto_reattach the heartbeat thread attaches a new session as soon as the daemon
answers (SessionEvent("ready", ...)); `reattach()` adopts it (generation + 1) and the engine
recomputes what it had. Calls keep raising until reattach(), so nothing started before the loss
runs against the new session by accident."""

import dataclasses
import logging
import mmap
import os
import threading
import time
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from . import convert, lease
from .errors import CacheManagerError, from_rpc_error
from .fast_path import METHODS as FAST_METHODS
from .fast_path import FastPath, open_fast_path
from .pool import HostPool, check_layer_places
from .share_channel import fetch_shared_fds
from .types import (Allocation, CompressResult, FetchedLayer, LoadedPrefix, ModelSpec,
                    ParkedLayer, Policy, PrefixCodebook, SequenceInfo, SequenceSummary, Stats,
                    StepOp, StepResult, StoredPrefix, TransferResult)
from .v1 import cachemgr_pb2 as pb
from .v1 import cachemgr_pb2_grpc as pb_grpc

CALL_TIMEOUT = 10.0
HEAVY_CALL_TIMEOUT = 600.0  # Compress, Fetch, Park: CPU work proportional to the sequence
OPERATOR_METADATA_KEY = "x-cachemgr-operator"

_log = logging.getLogger("cachemgr")
_C = grpc.StatusCode


@dataclasses.dataclass
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
    TLS). Its own connection (not shared with other channels to the target) with a short
    reconnect backoff (at most 1 s, gRPC's default grows to 2 minutes), so a restarted daemon is
    reached again at once."""
    if target.startswith("/"):
        target = "unix:" + target
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1),
               ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
               ("grpc.max_reconnect_backoff_ms", 1000)]
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

    def future(self, method: str, request, timeout: float):
        return getattr(self.stub, method).future(request, timeout=timeout,
                                                 metadata=self.metadata)

    def close(self):
        self.channel.close()


@dataclasses.dataclass
class SessionEvent:
    """What the heartbeat thread (or the call that noticed first) reports.

    kind: "lost" (generation `generation` is lost, its mapping already revoked; `error` is what
    calls now raise) or "ready" (a new session is attached in the background; reattach() adopts
    it as generation `generation`)."""
    kind: str
    generation: int
    error: Optional[CacheManagerError] = None


class _Generation:
    """One attached session of the daemon: identity, lease and mapping of the pool."""

    def __init__(self, response, requested: ModelSpec, sent_ns: int):
        self.number = 0  # set when adopted
        self.token = response.session_token
        self.client_id = response.client_id
        self.boot_id = response.boot_id
        self.fast_socket_path = response.fast_socket_path
        pool = response.pool
        self.pool_id = pool.pool_id
        # What the pool maps: a group member's shard of the heads.
        self.model = convert.model_from_proto(pool.model)
        self.group_name = pool.group_name
        self.group_rank = pool.group_rank
        self.group_size = pool.group_size or 1
        # The whole model (what positions and kept rows of Compress / Fetch are laid out by).
        self.whole_model = dataclasses.replace(
            self.model, num_q_heads=self.model.num_q_heads * self.group_size,
            num_kv_heads=self.model.num_kv_heads * self.group_size)
        self.num_blocks = pool.num_blocks
        self.heartbeat_interval = (response.heartbeat_interval_ms or 1000) / 1000.0
        self.lease_timeout_ms = response.lease_timeout_ms
        self.lease_timeout = response.lease_timeout_ms / 1000.0
        self.backend = pb.Backend.Name(pool.backend)
        self.deadline_ns = 0
        self.renew(sent_ns, self.lease_timeout_ms)
        self.pool = None
        self._input_map = None
        self._input_range = None
        self.input_buffer = None
        self._map(pool)

    def _map(self, pool) -> None:
        fds = fetch_shared_fds(pool.share_socket_path, self.token)
        regions = len(pool.regions)
        # memfd and VMM pools pass one descriptor per region, legacy CUDA IPC none; the input
        # buffer's memfd comes last.
        region_fds = 0 if pool.share_method == pb.SHARE_METHOD_CUDA_IPC_HANDLE else regions
        if len(fds) != region_fds + 1 or pool.input_buffer_region_index != region_fds:
            for fd in fds:
                os.close(fd)
            raise CacheManagerError(_C.DATA_LOSS,
                                    f"share channel passed {len(fds)} descriptors for "
                                    f"{region_fds} region descriptors and the input buffer")
        places = [(l.region_index, l.offset, l.bytes) for l in pool.layers]
        try:
            check_layer_places(self.model, pool.num_blocks, [r.bytes for r in pool.regions],
                               places)
        except CacheManagerError:
            for fd in fds:
                os.close(fd)
            raise
        try:
            if pool.share_method == pb.SHARE_METHOD_MEMFD:
                self.pool = HostPool(self.model, pool.num_blocks, fds[:regions],
                                     [r.bytes for r in pool.regions], places)
            elif pool.share_method in (pb.SHARE_METHOD_CUDA_VMM_FD,
                                       pb.SHARE_METHOD_CUDA_IPC_HANDLE):
                from .device_pool import CudaError, DevicePool
                vmm = pool.share_method == pb.SHARE_METHOD_CUDA_VMM_FD
                try:
                    self.pool = DevicePool(
                        self.model, pool.num_blocks, pool.device,
                        "vmm_fd" if vmm else "ipc_handle",
                        [(fds[i] if vmm else None, r.bytes, r.cuda_ipc_handle)
                         for i, r in enumerate(pool.regions)], places)
                except CudaError as e:
                    raise CacheManagerError(_C.FAILED_PRECONDITION,
                                            f"opening the CUDA pool {pool.pool_id}: {e}") from e
            else:
                for fd in fds[:region_fds]:
                    os.close(fd)
                raise CacheManagerError(
                    _C.UNIMPLEMENTED,
                    f"the pool is shared by {pb.ShareMethod.Name(pool.share_method)}, which "
                    "this client does not know")
            self._input_map = mmap.mmap(fds[region_fds], pool.input_buffer_bytes,
                                        mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._input_range = (lease.buffer_address(self._input_map), pool.input_buffer_bytes)
        except BaseException:
            if self.pool is not None:
                self.pool.close()
            raise
        finally:
            os.close(fds[region_fds])
        self.input_buffer = np.frombuffer(self._input_map, dtype=np.float32)

    def renew(self, sent_ns: int, granted_ms: int) -> None:
        self.deadline_ns = max(self.deadline_ns,
                               lease.local_deadline(sent_ns, granted_ms, self.lease_timeout_ms))

    def lease_left(self, now_ns: int) -> bool:
        return now_ns < self.deadline_ns

    def revoke(self) -> None:
        self.pool.revoke()
        if self._input_range is not None:
            lease.revoke_host_mapping(*self._input_range)
            self._input_range = None

    def close(self) -> None:
        self.input_buffer = None
        if self._input_map is not None:
            try:
                self._input_map.close()
            except BufferError:
                pass  # a view still exported by the caller keeps the mapping alive
        self.pool.close()


class Session:
    """See the module docstring. Create with Session.attach()."""

    def __init__(self, caller: _Caller, request, model: ModelSpec, heartbeat: bool,
                 auto_reattach: bool = True,
                 on_event: Optional[Callable[[SessionEvent], None]] = None,
                 revoke_on_loss: bool = True, fast_path: bool = True):
        self._call = caller
        self._use_fast_path = fast_path
        self._fast: Optional[FastPath] = None
        self._attach_request = request
        self._requested_model = model
        self._auto_reattach = auto_reattach
        self._on_event = on_event
        self._revoke_on_loss = revoke_on_loss
        self._lock = threading.RLock()  # session state below
        self._reattach_lock = threading.Lock()
        self._generations: List[_Generation] = []
        self._current: Optional[_Generation] = None
        self._lost: Optional[CacheManagerError] = None
        self._lost_released = True
        self._revoked_at: Optional[float] = None
        self._pending: Optional[_Generation] = None
        self._unreachable: Optional[CacheManagerError] = None
        self._unreachable_since = 0
        self._closed = False
        self._stop = False
        self._wake = threading.Event()
        self._hb_future = None
        self._in_flight = set()  # futures of session calls, cancelled when the session is lost
        self._adopt(self._attach_generation())
        self._heartbeat_thread = None
        if heartbeat:
            self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                                      name=f"cachemgr-heartbeat-{self.client_id}")
            self._heartbeat_thread.start()

    # ---- lifecycle --------------------------------------------------------------------------

    @classmethod
    def attach(cls, target: str, client_name: str, model: ModelSpec, num_blocks: int = 0,
               input_buffer_bytes: int = 0, heartbeat: bool = True,
               bearer_token: Optional[str] = None, auto_reattach: bool = True,
               on_event: Optional[Callable[[SessionEvent], None]] = None,
               tls: Optional[TlsOptions] = None, revoke_on_loss: bool = True,
               group: Optional[Tuple] = None, device: str = "",
               fast_path: bool = True) -> "Session":
        """Attaches to the daemon at `target` (a Unix socket path, or host:port with
        `bearer_token` and `tls`), creating the model's pool with `num_blocks` blocks per layer
        if it is the first client of this user (0: the daemon decides), and maps the pool.
        `heartbeat`: run the heartbeat thread (which also revokes the mapping when the lease runs
        out and, with `auto_reattach`, attaches a new session after a loss).
        `on_event(SessionEvent)` is called on that thread, or on the thread whose call noticed a
        loss first; it must return quickly and not call reattach() or detach().
        `revoke_on_loss=False` keeps the pool mapped after a loss, until detach(): for memory the
        process cannot stop using, such as an engine's KV cache allocated in a pool of its own
        (cachemgr.integrations.vllm_mem_pool). The daemon reclaims the blocks all the same, so
        only a pool no other client uses may be kept. A memfd or CUDA VMM mapping holds its memory
        until it is unmapped, even after the daemon released or lost it; what CUDA does with a
        legacy IPC mapping whose exporter freed the memory is not specified.
        `group=(name, rank, size)`: this session is rank `rank` of a tensor-parallel engine of
        `size` ranks (docs/MULTINODE.md, "Groups"); `model` is the whole model, and the session
        maps its rank's shard of the KV heads (`model` of the session: the shard's description;
        `whole_model`: the whole one). The group's members share one block table per layer and
        may act on each other's sequences; before a Compress with inputs, every rank writes its
        share of them (write_inputs) and one rank calls compress(input_written=...). A fourth
        element, the devices of the ranks' shards (e.g. GPU UUIDs), puts each on its own.
        `device`: the daemon device the pool lives on (empty: the daemon's first).
        `fast_path`: send heartbeat-free bookkeeping (allocate, free, fork, step) through the
        daemon's fast path socket when it offers one (local Unix-socket clients), gRPC
        otherwise; the calls answer the same either way."""
        caller = _Caller(target, bearer_token, tls)
        request = pb.AttachRequest(client_name=client_name, model=convert.model_to_proto(model),
                                   num_blocks=num_blocks, input_buffer_bytes=input_buffer_bytes)
        request.device = device
        if group is not None:
            name, rank, size, *devices = group
            request.group.CopyFrom(pb.GroupMembership(name=name, rank=rank, size=size,
                                                      devices=devices[0] if devices else []))
        try:
            return cls(caller, request, model, heartbeat, auto_reattach, on_event,
                       revoke_on_loss, fast_path)
        except BaseException:
            caller.close()
            raise

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def detach(self) -> Optional[int]:
        """Ends the session (the daemon frees every sequence of it); returns the number of
        sequences freed, or None if already detached or lost (nothing left to end).
        Idempotent."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            self._stop = True
        self._wake.set()
        future = self._hb_future
        if future is not None:
            future.cancel()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join()
        with self._lock:
            pending, self._pending = self._pending, None
            lost, released = self._lost, self._lost_released
            self._lost_released = True
        if pending is not None:
            self._give_back(pending.token)
            pending.close()
        freed = None
        if lost is None:
            try:
                response = self._call("Detach",
                                      pb.DetachRequest(session_token=self._current.token))
                freed = response.sequences_freed
            except CacheManagerError:
                freed = None
        elif not released:
            self._give_back(self._current.token)
        for g in self._generations:
            g.close()
        if self._fast is not None:
            self._fast.close()
        self._call.close()
        return freed

    # ---- the current generation -------------------------------------------------------------

    @property
    def fast_path_calls(self) -> int:
        """Calls this session made through the fast path (0 when the daemon offers none, or
        with fast_path=False)."""
        fast = self._fast
        return 0 if fast is None else fast.calls

    @property
    def generation(self) -> int:
        """1 after attach, + 1 at each reattach()."""
        return self._current.number

    client_id = property(lambda self: self._current.client_id)
    boot_id = property(lambda self: self._current.boot_id, doc="the daemon's boot id")
    pool_id = property(lambda self: self._current.pool_id)
    model = property(lambda self: self._current.model,
                     doc="the model as the pool maps it (a group member: its shard of the heads)")
    whole_model = property(lambda self: self._current.whole_model,
                           doc="the whole model (for a group member: every rank's heads)")
    group_name = property(lambda self: self._current.group_name)
    group_rank = property(lambda self: self._current.group_rank)
    group_size = property(lambda self: self._current.group_size)
    num_blocks = property(lambda self: self._current.num_blocks)
    heartbeat_interval = property(lambda self: self._current.heartbeat_interval)
    lease_timeout = property(lambda self: self._current.lease_timeout)
    backend = property(lambda self: self._current.backend)
    pool = property(lambda self: self._current.pool,
                    doc="the pool mapping (HostPool or DevicePool) of the current generation")
    input_buffer = property(lambda self: self._current.input_buffer)

    # ---- lease ------------------------------------------------------------------------------

    @property
    def lease_ok(self) -> bool:
        """Cheap: whether the session is usable and its local lease deadline has not passed.
        Check it before each batch of writes into the pool, and after reads whose results
        matter: True also means no revocation had begun, so what was read before came from the
        pool. False means the mapping is revoked (a revocation in progress is waited for)."""
        if self._lost is not None:
            with self._lock:  # _mark_lost revokes under it
                return False
        g = self._current
        if g.lease_left(lease.boot_ns()):
            return True
        self._mark_lost(g, self._expired_error(g))
        return False

    @property
    def status(self) -> Optional[CacheManagerError]:
        """None while usable; otherwise the error every call raises."""
        return None if self.lease_ok else self._lost

    @property
    def mapping_revoked_at(self) -> Optional[float]:
        """time.time() when the current generation's mapping was revoked; None while it is
        not."""
        return self._revoked_at

    def reattach(self) -> int:
        """After a loss: adopts the session the heartbeat thread attached in the background,
        or attaches one now (raises UNAVAILABLE while the daemon is still down). Returns the new
        generation. The lost generation's sequences are gone: the engine recomputes them.
        FAILED_PRECONDITION if the session is not lost, or after detach(). No thread may still
        work with the old generation's allocations (their slots mean nothing in the new
        pool)."""
        with self._reattach_lock:
            if self._closed:
                raise CacheManagerError(_C.FAILED_PRECONDITION,
                                        f"session of client {self.client_id} is detached")
            if self.lease_ok:
                raise CacheManagerError(
                    _C.FAILED_PRECONDITION,
                    f"generation {self.generation} of client {self.client_id} is alive: "
                    "reattach() replaces a lost session only")
            with self._lock:
                nxt, self._pending = self._pending, None
            if nxt is not None and not nxt.lease_left(lease.boot_ns()):
                nxt.close()
                nxt = None
            if nxt is None:
                nxt = self._attach_generation()
            self._adopt(nxt)
            self._wake.set()  # the heartbeat thread follows the new generation
            return nxt.number

    def _attach_generation(self) -> _Generation:
        sent = lease.boot_ns()
        response = self._call("Attach", self._attach_request)
        try:
            g = _Generation(response, self._requested_model, sent)
        except BaseException:
            self._give_back(response.session_token)  # attached but could not map
            raise
        if not g.lease_left(lease.boot_ns()):  # attaching took most of a lease: renew now
            try:
                beat_sent = lease.boot_ns()
                left = self._call("Heartbeat", pb.HeartbeatRequest(session_token=g.token))
                g.renew(beat_sent, min(g.lease_timeout_ms, left.lease_remaining_ms))
            except CacheManagerError:
                pass
            if not g.lease_left(lease.boot_ns()):
                self._give_back(g.token)
                g.close()
                raise CacheManagerError(_C.DEADLINE_EXCEEDED,
                                        f"attaching took longer than the "
                                        f"{g.lease_timeout_ms} ms lease")
        return g

    def _adopt(self, g: _Generation) -> None:
        path = g.fast_socket_path if self._use_fast_path else ""
        if self._fast is None or self._fast.path != path:
            if self._fast is not None:
                self._fast.close()
            self._fast = open_fast_path(path)
        with self._lock:
            previous = self._current
            g.number = 1 if previous is None else previous.number + 1
            give_back = previous.token if previous is not None and not self._lost_released \
                else None
            self._generations.append(g)
            self._current = g
            self._revoked_at = None
            self._lost_released = True
            self._unreachable = None
            self._lost = None
        if give_back is not None:
            self._give_back(give_back)

    def _give_back(self, token: str) -> None:
        """Best-effort Detach of a token this client no longer uses."""
        try:
            self._call("Detach", pb.DetachRequest(session_token=token), timeout=1.0)
        except CacheManagerError:
            pass  # the daemon's lease reaps it

    def _expired_error(self, g: _Generation) -> CacheManagerError:
        when = lease.format_boot_time(g.deadline_ns)
        with self._lock:
            unreachable, since = self._unreachable, self._unreachable_since
        if unreachable is not None:
            return CacheManagerError(
                _C.UNAVAILABLE,
                f"cachemgrd unreachable since {lease.format_boot_time(since)} "
                f"({unreachable.message}); the lease of client {g.client_id} (generation "
                f"{g.number}) expired at {when}, so its sequences and blocks are gone; the pool "
                "mapping was revoked; reattach() starts a new session once the daemon is back")
        return CacheManagerError(
            _C.ABORTED,
            f"lease expired at {when} (client {g.client_id}, generation {g.number}, not renewed "
            f"for {g.lease_timeout_ms} ms); the daemon reclaimed this client's blocks: its "
            "sequences are gone and the pool mapping was revoked; reattach() starts a new "
            "session")

    def _mark_lost(self, g: _Generation, error: CacheManagerError) -> None:
        """Revokes `g`'s mapping, then marks the session lost, unless `g` is not current or
        already lost; reports the loss."""
        with self._lock:
            if g is not self._current or self._lost is not None:
                return
            # Lost before the revocation begins, so lease_ok True means none has begun;
            # lease_ok False waits for this lock, so it also means the stores are cut off.
            self._lost = error
            try:
                if self._revoke_on_loss:
                    g.revoke()
                    self._revoked_at = time.time()
            except OSError as e:
                error = CacheManagerError(error.code, f"{error.message}; REVOKING THE MAPPING "
                                                      f"FAILED ({e}): stop writing into the pool")
            self._lost = error
            self._lost_released = False
            in_flight = list(self._in_flight)
        for future in in_flight:  # their replies would refer to the revoked mapping
            future.cancel()
        if self._fast is not None:
            self._fast.interrupt()
        self._wake.set()
        self._emit(SessionEvent("lost", g.number, error))

    def _emit(self, event: SessionEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001 - a broken callback must not break the session
            _log.exception("cachemgr on_event callback failed")

    def _check_usable(self, g: _Generation) -> None:
        if g is self._current:
            if self.lease_ok:
                return
            lost = self._lost
            if lost is not None:
                raise lost
        # reattach() ran meanwhile.
        raise CacheManagerError(
            _C.ABORTED, f"generation {g.number} of client {g.client_id} was lost while this "
                        f"call was made (the session is now generation {self.generation}): the "
                        "call's sequences are gone")

    # ---- calls ------------------------------------------------------------------------------

    def _session_call(self, method: str, make_request, timeout: float = CALL_TIMEOUT):
        """One call of the current generation; `make_request(token)` builds the request. Raises
        the loss without calling once the session is lost; renews the local lease when the
        daemon answered; raises a loss that happened while the call was in flight instead of
        returning its reply (which would refer to a revoked mapping)."""
        if self._closed:
            raise CacheManagerError(_C.FAILED_PRECONDITION,
                                    f"session of client {self.client_id} is detached")
        g = self._current
        self._check_usable(g)
        sent = lease.boot_ns()
        fast = self._fast
        if fast is not None and method in FAST_METHODS:
            try:
                response = fast.call(method, make_request(g.token), timeout)
            except CacheManagerError as error:
                if self._lost is not None:
                    self._check_usable(g)
                if error.code in (_C.UNAVAILABLE, _C.NOT_FOUND, _C.FAILED_PRECONDITION):
                    self._wake.set()  # the heartbeat thread checks the session now
                raise
            if response is not None:
                g.renew(sent, g.lease_timeout_ms)
                self._check_usable(g)
                return response
        future = self._call.future(method, make_request(g.token), timeout)
        with self._lock:
            self._in_flight.add(future)
        try:
            if self._lost is not None:
                future.cancel()
            response = future.result()
        except grpc.FutureCancelledError:
            self._check_usable(g)  # cancelled because the session was lost: raises that
            raise CacheManagerError(_C.CANCELLED, f"{method} was cancelled") from None
        except grpc.RpcError as e:
            error = from_rpc_error(e)
            if error.code == _C.CANCELLED:
                self._check_usable(g)
            if error.code in (_C.UNAVAILABLE, _C.NOT_FOUND, _C.FAILED_PRECONDITION):
                self._wake.set()  # the heartbeat thread checks the session now
            raise error from None
        finally:
            with self._lock:
                self._in_flight.discard(future)
        g.renew(sent, g.lease_timeout_ms)
        self._check_usable(g)
        return response

    def heartbeat(self) -> float:
        """Renews the lease; returns the seconds left on it."""
        g = self._current
        self._check_usable(g)
        left = self._heartbeat_generation(g)
        self._check_usable(g)
        return left

    def _heartbeat_generation(self, g: _Generation) -> float:
        """One Heartbeat for `g`. NOT_FOUND and FAILED_PRECONDITION (a token of an earlier boot)
        are definitive: the session is gone, and `g` is marked lost if it is current (the error
        raised is then the loss). Transport failures are recorded for the expiry message."""
        timeout = min(CALL_TIMEOUT, max(0.1, (g.deadline_ns - lease.boot_ns()) / 1e9 + 0.1))
        sent = lease.boot_ns()
        try:
            future = self._call.future("Heartbeat", pb.HeartbeatRequest(session_token=g.token),
                                       timeout)
            self._hb_future = future
            try:
                response = future.result()
            finally:
                self._hb_future = None
        except grpc.RpcError as e:
            error = from_rpc_error(e)
        except grpc.FutureCancelledError:
            error = CacheManagerError(_C.CANCELLED, "heartbeat cancelled (detaching)")
        else:
            g.renew(sent, min(g.lease_timeout_ms, response.lease_remaining_ms))
            with self._lock:
                self._unreachable = None
            return response.lease_remaining_ms / 1e3
        if error.code == _C.NOT_FOUND:
            self._mark_lost(g, CacheManagerError(
                _C.ABORTED,
                f"the daemon no longer knows client {g.client_id} (generation {g.number}): "
                f"{error.message}; its sequences and blocks are gone and the pool mapping was "
                "revoked; reattach() starts a new session"))
        elif error.code == _C.FAILED_PRECONDITION:
            self._mark_lost(g, CacheManagerError(
                _C.ABORTED, f"cachemgrd restarted: {error.message}; the pool mapping was "
                            "revoked; reattach() starts a new session"))
        elif error.code == _C.UNAVAILABLE:
            with self._lock:
                if self._unreachable is None:
                    self._unreachable_since = sent
                self._unreachable = error
        if g is self._current and self._lost is not None:
            raise self._lost
        raise error

    def _heartbeat_loop(self) -> None:
        last_beat = lease.boot_ns()
        while True:
            g = self._current
            interval = int(g.heartbeat_interval * 1e9)
            wake = last_beat + interval
            if self._lost is None:
                wake = min(wake, g.deadline_ns)
            nudged = self._wake.wait(max(0.0, (wake - lease.boot_ns()) / 1e9))
            if self._stop:
                return
            self._wake.clear()
            now = lease.boot_ns()
            try:
                if self._lost is None:
                    if not self.lease_ok:
                        continue  # just lost (and revoked): re-attach from the next round
                    # A nudge beats at most four times per interval, however fast calls fail.
                    if now >= last_beat + interval or (nudged and
                                                       now >= last_beat + interval // 4):
                        last_beat = lease.boot_ns()
                        self._heartbeat_generation(g)
                    continue
                self._release_lost()
                if now >= last_beat + interval // 4:
                    last_beat = lease.boot_ns()
                    if self._auto_reattach:
                        self._tend_pending()
            except CacheManagerError:
                pass  # recorded: the loss, or the transport failure named when the lease ends
            except Exception:  # noqa: BLE001 - the thread must outlive surprises
                _log.exception("cachemgr heartbeat thread")
                time.sleep(g.heartbeat_interval)

    def _release_lost(self) -> None:
        """Gives the lost generation's token back once (the daemon may still hold it when the
        loss was local, e.g. a stalled process)."""
        with self._lock:
            if self._lost is None or self._lost_released:
                return
            self._lost_released = True
            token = self._current.token
        self._give_back(token)

    def _tend_pending(self) -> None:
        """While lost: attaches a new session once the daemon answers, and keeps it alive until
        reattach() adopts it."""
        with self._lock:
            pending = self._pending
        if pending is not None:
            try:
                self._heartbeat_generation(pending)
                alive = pending.lease_left(lease.boot_ns())
            except CacheManagerError as e:
                alive = e.code not in (_C.NOT_FOUND, _C.FAILED_PRECONDITION) and \
                    pending.lease_left(lease.boot_ns())
            if not alive:
                with self._lock:
                    if self._pending is pending:
                        self._pending = None
                pending.close()
            return
        g = self._attach_generation()
        with self._lock:
            if self._lost is not None and self._pending is None and not self._closed:
                self._pending = g
                number = self._current.number + 1
            else:
                number = 0
        if number == 0:  # adopted meanwhile by a reattach() that attached on its own
            self._give_back(g.token)
            g.close()
            return
        self._emit(SessionEvent("ready", number))

    # ---- sequences --------------------------------------------------------------------------

    def allocate(self, sequence_id: str, num_new_tokens: int) -> Allocation:
        return convert.allocation_from_proto(self._session_call("Allocate", lambda t: (
            pb.AllocateRequest(session_token=t, sequence_id=sequence_id,
                               num_new_tokens=num_new_tokens))))

    def free(self, sequence_id: str) -> int:
        """Returns the blocks whose last reference went away."""
        return self._session_call("Free", lambda t: pb.FreeRequest(
            session_token=t, sequence_id=sequence_id)).blocks_released

    def step(self, ops: Sequence[StepOp], include_slot_mapping: bool = False) -> List[StepResult]:
        """A scheduler step in one call (docs/PERF.md "Step"): `ops` (StepOp.allocate / free /
        fork / match_prefix) applied in order by the daemon, each as its own call would be (all or nothing),
        one StepResult per op with its error, if any. Raises only for the session, more than
        4096 ops or a reply too large. Slot mappings only with include_slot_mapping (otherwise
        a token's slot is block_id * block_size + its offset in the block)."""
        request_ops = convert.step_ops_to_proto(ops)
        return convert.step_results_from_proto(self._session_call("Step", lambda t: pb.StepRequest(
            session_token=t, ops=request_ops, include_slot_mapping=include_slot_mapping)),
            self.model.num_layers)

    def fork(self, parent_sequence_id: str, child_sequence_id: str) -> SequenceInfo:
        return convert.sequence_from_proto(self._session_call("Fork", lambda t: pb.ForkRequest(
            session_token=t, parent_sequence_id=parent_sequence_id,
            child_sequence_id=child_sequence_id)).child)

    @property
    def session_token(self) -> str:
        """The session's secret token. Hand it only to whoever may put sequences into this
        session: a scheduler that asks a peer daemon to transfer one here."""
        return self._current.token

    def transfer_sequence(self, sequence_id: str, peer: str, destination_session_token: str,
                          transfer_id: str, destination_sequence_id: str = "",
                          move: bool = False, timeout_ms: int = 0) -> TransferResult:
        """Copies (or with `move`, moves) this session's sequence to the daemon `peer` (an address
        or node name from `cachemgrctl peers`), into the session of destination_session_token
        there. A retry with the same transfer_id is answered from the first attempt."""
        timeout = (timeout_ms or 30000) / 1000.0 + CALL_TIMEOUT
        r = self._session_call("TransferSequence", lambda t: pb.TransferSequenceRequest(
            session_token=t, sequence_id=sequence_id, peer=peer,
            destination_session_token=destination_session_token,
            destination_sequence_id=destination_sequence_id, transfer_id=transfer_id, move=move,
            timeout_ms=timeout_ms), timeout=timeout)
        return TransferResult(r.destination_sequence_id, r.payload_bytes, r.wire_bytes,
                              list(r.layer_digests), r.source_released, r.replayed, r.row_link,
                              r.row_link_reused)

    def get_sequence(self, sequence_id: str, include_kv_digest: bool = False) -> SequenceInfo:
        return convert.sequence_from_proto(self._session_call(
            "GetSequence", lambda t: pb.GetSequenceRequest(
                session_token=t, sequence_id=sequence_id,
                include_kv_digest=include_kv_digest)).sequence)

    def list_sequences(self) -> List[SequenceSummary]:
        out: List[SequenceSummary] = []
        page_token = ""
        while True:  # one page per call, until the daemon says it was the last
            response = self._session_call("ListSequences", lambda t: pb.ListSequencesRequest(
                session_token=t, page_token=page_token))
            out.extend(convert.summaries_from_proto(response))
            page_token = response.next_page_token
            if not page_token:
                return out

    # ---- prefix store (docs/PREFIX_STORE.md) --------------------------------------------------

    def store_prefix(self, sequence_id: str, block_hashes: Sequence[bytes],
                     first_block: int = 0,
                     codebook: Optional[PrefixCodebook] = None) -> StoredPrefix:
        """Stores block first_block + i of the (uncompressed) sequence, in every layer, under
        block_hashes[i]; the pool keeps them after the sequence and this client are gone. With
        `codebook`, the new entries are held as codebooks (no blocks; rebuilt on load)."""
        def request(t):
            r = pb.StorePrefixRequest(session_token=t, sequence_id=sequence_id,
                                      first_block=first_block, block_hashes=list(block_hashes))
            if codebook is not None:
                r.codebook.theta_k = codebook.theta_k
                r.codebook.theta_v = codebook.theta_v
                if codebook.first_position is not None:
                    r.codebook.first_position = codebook.first_position
            return r
        response = self._session_call("StorePrefix", request, timeout=HEAVY_CALL_TIMEOUT)
        return StoredPrefix(response.stored, response.already_stored, response.codebook_layers,
                            response.codebook_bytes)

    def match_prefix(self, block_hashes: Sequence[bytes]) -> int:
        """How many leading block_hashes the pool has stored: a Step of one lookup, so that it
        takes the fast path where the session has one (the same answer and errors as the
        MatchPrefix call, which a Step too large for the fast path goes through instead)."""
        result = self.step([StepOp.match_prefix(block_hashes)])[0]
        if result.error is not None:
            raise result.error
        return result.matched_blocks

    def load_prefix(self, sequence_id: str, block_hashes: Sequence[bytes]) -> LoadedPrefix:
        """Creates `sequence_id` holding the stored blocks of the leading hashes (their digests
        checked); read them through the pool, then free the sequence. No sequence is created
        when nothing is served."""
        response = self._session_call("LoadPrefix", lambda t: pb.LoadPrefixRequest(
            session_token=t, sequence_id=sequence_id, block_hashes=list(block_hashes)),
            timeout=HEAVY_CALL_TIMEOUT)
        sequence = (convert.sequence_from_proto(response.sequence)
                    if response.loaded_blocks else None)
        return LoadedPrefix(response.loaded_blocks, response.corrupt_blocks, sequence)

    # ---- compression ------------------------------------------------------------------------

    def write_inputs(self, queries: Optional[np.ndarray] = None,
                     scores: Optional[np.ndarray] = None) -> None:
        """Writes Compress inputs into this session's input buffer (see compress); a group
        member writes its heads' share: `queries` [num_layers, num_queries, its num_q_heads,
        head_dim] or `scores` [num_layers, its num_q_heads, num_tokens]."""
        if (queries is None) == (scores is None):
            raise ValueError("give queries or scores")
        array = queries if queries is not None else scores
        if queries is not None and queries.ndim != 4:
            raise ValueError("queries must be [num_layers, num_queries, num_q_heads, head_dim]")
        flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
        buffer = self.input_buffer
        if flat.size > buffer.size:
            raise CacheManagerError(
                _C.INVALID_ARGUMENT,
                f"{'queries' if queries is not None else 'scores'} of {flat.size * 4} bytes "
                f"exceed the {buffer.size * 4}-byte input buffer (attach with a larger "
                "input_buffer_bytes)")
        buffer[:flat.size] = flat

    def compress(self, sequence_id: str, policy: Policy = Policy(),
                 reserve_ratio: Optional[float] = None, byte_ratio: Optional[float] = None,
                 queries: Optional[np.ndarray] = None,
                 scores: Optional[np.ndarray] = None,
                 input_written: Optional[str] = None, num_queries: int = 0,
                 background: bool = False) -> CompressResult:
        """Compresses a sequence in place. Exactly one of `reserve_ratio` (the paper's r) and
        `byte_ratio` (honest bytes held / full bytes, met within 1%). Inputs, written into the
        input buffer the daemon lent: `queries` float32 [num_layers, num_queries, num_q_heads,
        head_dim] (post-RoPE observation-window queries) or `scores` float32 [num_layers,
        num_q_heads, num_tokens]; neither for policies that need none. Or, inputs already
        written (write_inputs; by every rank of a group): `input_written` "queries" (with
        `num_queries`) or "scores". With `background` the call returns (pending=True) once the
        daemon copied the inputs; the sequence stays readable and appendable meanwhile and
        finish_compress applies the result."""
        if (reserve_ratio is None) == (byte_ratio is None):
            raise ValueError("give exactly one of reserve_ratio and byte_ratio")
        if queries is not None and scores is not None:
            raise ValueError("give queries or scores, not both")
        if input_written is not None and (queries is not None or scores is not None):
            raise ValueError("give queries / scores or input_written, not both")
        if input_written not in (None, "queries", "scores"):
            raise ValueError('input_written must be "queries" or "scores"')
        request = pb.CompressRequest(sequence_id=sequence_id,
                                     policy=convert.policy_to_proto(policy),
                                     cuda_ipc_event_handle=self._write_event_handle(),
                                     background=background)
        if reserve_ratio is not None:
            request.reserve_ratio = reserve_ratio
        else:
            request.byte_ratio = byte_ratio
        request.input = pb.INPUT_SOURCE_NONE
        buffer = self.input_buffer
        for array, source in ((queries, pb.INPUT_SOURCE_WINDOW_QUERIES),
                              (scores, pb.INPUT_SOURCE_SCORES)):
            if array is None:
                continue
            flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
            if flat.size > buffer.size:
                raise CacheManagerError(
                    _C.INVALID_ARGUMENT,
                    f"{'queries' if source == pb.INPUT_SOURCE_WINDOW_QUERIES else 'scores'} of "
                    f"{flat.size * 4} bytes exceed the {buffer.size * 4}-byte input "
                    "buffer (attach with a larger input_buffer_bytes)")
            buffer[:flat.size] = flat
            request.input = source
            if source == pb.INPUT_SOURCE_WINDOW_QUERIES:
                if array.ndim != 4:
                    raise ValueError("queries must be [num_layers, num_queries, num_q_heads, "
                                     "head_dim]")
                request.num_queries = array.shape[1]
        if input_written == "queries":
            request.input = pb.INPUT_SOURCE_WINDOW_QUERIES
            request.num_queries = num_queries
        elif input_written == "scores":
            request.input = pb.INPUT_SOURCE_SCORES

        def with_token(token):
            request.session_token = token
            return request
        return convert.compress_result_from_proto(
            self._session_call("Compress", with_token, timeout=HEAVY_CALL_TIMEOUT),
            self.whole_model)

    def finish_compress(self, sequence_id: str, wait: bool = True) -> CompressResult:
        """Applies a background compress: with `wait` once its work is done, without it
        pending=True while it works. Call it when the KV writes into the rows appended since are
        complete: those rows follow the kept ones. A refusal changes nothing (still pending:
        retry, or free); a work that failed left the sequence as it was, uncompressed, and its
        error is raised until the next compress."""
        request = pb.FinishCompressRequest(sequence_id=sequence_id, wait=wait,
                                           cuda_ipc_event_handle=self._write_event_handle())

        def with_token(token):
            request.session_token = token
            return request
        return convert.compress_result_from_proto(
            self._session_call("FinishCompress", with_token, timeout=HEAVY_CALL_TIMEOUT),
            self.whole_model)

    def fetch(self, sequence_id: str, layers: Iterable[int] = ()) -> List[FetchedLayer]:
        """Makes layers (default all) resident: codebook layers are reconstructed into new
        blocks."""
        layers = list(layers)
        response = self._session_call("Fetch", lambda t: pb.FetchRequest(
            session_token=t, sequence_id=sequence_id, layers=layers),
            timeout=HEAVY_CALL_TIMEOUT)
        return convert.fetched_from_proto(response, self.whole_model)

    def park(self, sequence_id: str, layers: Iterable[int] = ()) -> List[ParkedLayer]:
        """Returns fetched codebook layers (default all) to the daemon's arena, coding the rows
        appended since Fetch; their blocks are released."""
        layers = list(layers)
        handle = self._write_event_handle()
        response = self._session_call("Park", lambda t: pb.ParkRequest(
            session_token=t, sequence_id=sequence_id, layers=layers,
            cuda_ipc_event_handle=handle), timeout=HEAVY_CALL_TIMEOUT)
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
                _C.FAILED_PRECONDITION,
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
        out: List[SequenceSummary] = []
        page_token = ""
        while True:  # one page per call, until the daemon says it was the last
            response = caller("ListSequences", pb.ListSequencesRequest(page_token=page_token))
            out.extend(convert.summaries_from_proto(response))
            page_token = response.next_page_token
            if not page_token:
                return out
    finally:
        caller.close()
