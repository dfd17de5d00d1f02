"""The fast path: a session's bookkeeping calls (Heartbeat, Allocate, Free, Fork, Step) over the
daemon's fast path socket (AttachResponse.fast_socket_path) instead of gRPC, with the same
request and reply messages and the same errors (docs/PERF.md, "The fast path").

Framing (cachemgr/util/fast_path_wire.h): each frame is a 4-byte little-endian body length and
the body. A request body is one method byte and the serialized request; a reply body is one
status code byte (the gRPC code, 0 = OK) and the serialized response, or the error message."""

import os
import select
import socket
import struct
import threading
import time
from typing import Optional

import grpc

from .errors import CacheManagerError
from .v1 import cachemgr_pb2 as pb

METHODS = {"Heartbeat": 1, "Allocate": 2, "Free": 3, "Fork": 4, "Step": 5}
_RESPONSES = {"Heartbeat": pb.HeartbeatResponse, "Allocate": pb.AllocateResponse,
              "Free": pb.FreeResponse, "Fork": pb.ForkResponse, "Step": pb.StepResponse}
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_HEADER = struct.Struct("<I")
MAX_REQUEST_BYTES = 1 << 20  # kMaxFastRequestBytes: a larger request goes through gRPC
_RECONNECT_AFTER = 1.0  # seconds without trying again after a failed connect


class FastPath:
    """One connection to the fast path socket, opened on first use. Thread-safe: a call that
    finds the connection busy (another thread's call) returns None, and the caller uses gRPC."""

    def __init__(self, path: str):
        self.path = path
        self.calls = 0  # calls the daemon answered (OK or not) through the fast path
        self._lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._retry_at = 0.0

    def call(self, method: str, request, timeout: float):
        """The response of `method`; raises CacheManagerError with the daemon's status as gRPC
        would. None when the fast path cannot take the call (busy, over MAX_REQUEST_BYTES, or no
        connection could be opened): nothing was sent."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            sock = self._connection()
            if sock is None:
                return None
            body = request.SerializeToString()
            if len(body) + 1 > MAX_REQUEST_BYTES:
                return None
            frame = _HEADER.pack(len(body) + 1) + bytes((METHODS[method],)) + body
            try:
                sock.settimeout(timeout)
                sock.sendall(frame)
                reply = self._receive(sock)
            except socket.timeout:
                self._drop()
                raise CacheManagerError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        "Deadline Exceeded") from None
            except OSError as e:
                self._drop()
                raise CacheManagerError(grpc.StatusCode.UNAVAILABLE,
                                        f"fast path connection to {self.path} failed: "
                                        f"{e}") from None
            self.calls += 1
            code = reply[0]
            if code != 0:
                raise CacheManagerError(_CODES.get(code, grpc.StatusCode.UNKNOWN),
                                        bytes(reply[1:]).decode("utf-8", "replace"))
            return _RESPONSES[method].FromString(reply[1:])
        finally:
            self._lock.release()

    def interrupt(self) -> None:
        """Ends a call in flight (it fails UNAVAILABLE) and the connection; any thread."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _connection(self) -> Optional[socket.socket]:
        sock = self._sock
        if sock is not None:
            # An idle connection has nothing to read: readable means the daemon closed it.
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return sock
            self._drop()
        if time.monotonic() < self._retry_at:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(1.0)
            sock.connect(self.path)
        except OSError:
            sock.close()
            self._retry_at = time.monotonic() + _RECONNECT_AFTER
            return None
        self._sock = sock
        return sock

    @staticmethod
    def _receive(sock: socket.socket) -> memoryview:
        data = sock.recv(65536)
        if not data:
            raise ConnectionResetError("the daemon closed the connection")
        while len(data) < _HEADER.size:
            more = sock.recv(65536)
            if not more:
                raise ConnectionResetError("the daemon closed the connection")
            data += more
        (length,) = _HEADER.unpack_from(data)
        want = _HEADER.size + length
        if len(data) < want:
            buffer = bytearray(want)
            buffer[:len(data)] = data
            view = memoryview(buffer)
            have = len(data)
            while have < want:
                got = sock.recv_into(view[have:])
                if got == 0:
                    raise ConnectionResetError("the daemon closed the connection")
                have += got
            return view[_HEADER.size:]
        return memoryview(data)[_HEADER.size:want]

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def open_fast_path(path: str) -> Optional[FastPath]:
    """A FastPath for `path`, or None when there is nothing to connect to."""
    if not path or not os.path.exists(path):
        return None
    return FastPath(path)
