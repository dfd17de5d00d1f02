"""Errors of the cachemgr client: every failed call raises CacheManagerError with the daemon's
gRPC status code and message unchanged."""

import grpc


class CacheManagerError(Exception):
    """A call to cachemgrd failed.

    Attributes:
        code: the grpc.StatusCode (e.g. INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND).
        message: the daemon's message; it names the offending request field.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def from_rpc_error(error: grpc.RpcError) -> CacheManagerError:
    return CacheManagerError(error.code(), error.details() or "")
