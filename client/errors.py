"""The client's exceptions: the service's own domain errors, whatever the transport.

A caller catches ``InvalidArgument`` (a ``ValueError``), ``NotFound`` (a ``KeyError``),
``Unavailable`` and so on, from a remote server or from the in-process transport alike.
"""

from __future__ import annotations

import grpc

from regulator_service.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    RegulatorError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    error_for_code,
)


def from_rpc_error(exc: grpc.RpcError) -> RegulatorError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    err = error_for_code(code, details or code.name)
    err.__cause__ = exc
    return err


__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "RegulatorError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]
