"""The client side of cachemgrd's share channel: a SOCK_SEQPACKET Unix socket that hands an
attached client the pool's memory as file descriptors (SCM_RIGHTS), since gRPC cannot carry
them. One request ("SHARE <token>"), one reply ("OK <n>" with n descriptors, or
"ERR <CODE> <message>"); see cachemgr/service/share_channel.h."""

import socket
from typing import List

import grpc

from .errors import CacheManagerError

_MAX_FDS = 64


def fetch_shared_fds(path: str, session_token: str, timeout: float = 30.0) -> List[int]:
    """The descriptors of `session_token`'s pool regions, then its input buffer. The caller owns
    them (close with os.close)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.send(f"SHARE {session_token}".encode())
            message, fds, _, _ = socket.recv_fds(sock, 4096, _MAX_FDS)
        except socket.timeout as e:
            raise CacheManagerError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"share channel {path}: no reply in {timeout} s") from e
        except OSError as e:
            raise CacheManagerError(grpc.StatusCode.UNAVAILABLE,
                                    f"share channel {path}: {e}") from e
    text = message.decode(errors="replace")
    if text.startswith("OK "):
        expected = int(text[3:])
        if expected != len(fds):
            for fd in fds:
                socket.close(fd)
            raise CacheManagerError(grpc.StatusCode.DATA_LOSS,
                                    f"share channel announced {expected} descriptors, passed "
                                    f"{len(fds)}")
        return list(fds)
    for fd in fds:
        socket.close(fd)
    if text.startswith("ERR "):
        code_name, _, detail = text[4:].partition(" ")
        code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.UNKNOWN)
        raise CacheManagerError(code, detail)
    raise CacheManagerError(grpc.StatusCode.INTERNAL, f"share channel reply {text!r}")
