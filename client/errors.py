"""The client's exceptions: the service's own domain errors, whatever the transport.

A caller catches ``InvalidArgument`` (a ``ValueError``), ``NotFound`` (a ``KeyError``),
``Unavailable`` and so on, from a remote server or from the in-process transport alike.
"""

from __future__ import annotations

import grpc

from regulator_service.errors import (
    AlreadyExists,
    DataLoss,
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
# HISTORY_BUSY: the regulator answers RESOURCE_EXHAUSTED with this message prefix when every paged
# history-read slot is taken (``serve --max-history-readers``); nothing ran.
from regulator_service.read_pacing import HISTORY_BUSY


# What grpcio's server answers when ``maximum_concurrent_rpcs`` (``serve --max-concurrent-rpcs``)
# sheds a call before any handler ran. It and HISTORY_BUSY are the RESOURCE_EXHAUSTED answers that
# are about load, not quota: retryable.
SHED_DETAILS = "Concurrent RPC limit exceeded!"


class Overloaded(Unavailable, ResourceExhausted):
    """The server shed the call (RESOURCE_EXHAUSTED from its concurrency limit, or all its
    history-read slots taken) without running it: nothing happened, and the same call may be
    retried after a backoff. It is an ``Unavailable``, so every delivery mode treats it like a
    server that is briefly down; real quotas (too many sessions, modalities or bytes) stay plain
    ``ResourceExhausted`` and are never retried."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def shed(details: str) -> Overloaded:
    """The error of a call the regulator shed (``details``: its answer), on either transport."""
    return Overloaded(f"the regulator is overloaded and shed the call ({details})")


def from_rpc_error(exc: grpc.RpcError) -> RegulatorError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (details == SHED_DETAILS or details.startswith(HISTORY_BUSY)):
        err: RegulatorError = shed(details)
    elif code == grpc.StatusCode.CANCELLED:
        # This library never cancels its own calls, so a CANCELLED it receives is the server's:
        # a call that reached a regulator as it shut down (seen during SIGTERM drains). Every
        # Regulator RPC is idempotent, so it is a transient outage, like UNAVAILABLE.
        err = Unavailable(f"the regulator cancelled the call; is it shutting down? ({details or 'no details'})")
    else:
        err = error_for_code(code, details or code.name)
    err.__cause__ = exc
    return err


__all__ = [
    "AlreadyExists",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "Overloaded",
    "RegulatorError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
    "shed",
]
