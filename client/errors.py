"""The client's exceptions: the service's own domain errors, whatever the transport.

A caller catches ``InvalidArgument`` (a ``ValueError``), ``NotFound`` (a ``KeyError``),
``Unavailable`` and so on, from a remote server or from the in-process transport alike.
"""

from __future__ import annotations

from typing import Optional

import grpc

from regulator_service.client_api import (
    RETRY_AFTER_KEY,
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

class Overloaded(Unavailable, ResourceExhausted):
    """The server shed the call (RESOURCE_EXHAUSTED with ``RETRY_AFTER_KEY``: its concurrency
    limit, all its history-read slots taken, or a Report or EndEpoch that would pass its
    ``--memory-budget`` with nothing left to evict) without running it: nothing happened, and the
    same call may be retried after a backoff. A budget refusal lasts until sessions close or the
    budget is raised, so it is retried only within the limits every outage has: the call's
    deadline, then ``wait_timeout`` (wait mode, which then fails loudly) or the deferred-message
    cap (fallback modes, whose steps train unregulated meanwhile). It is an ``Unavailable``, so every delivery mode treats it like a
    server that is briefly down; real quotas (too many sessions, modalities or bytes) stay plain
    ``ResourceExhausted`` and are never retried."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def shed(details: str) -> Overloaded:
    """The error of a call the regulator shed (``details``: its answer), on either transport."""
    return Overloaded(f"the regulator is overloaded and shed the call ({details})")


def retry_after_ms(exc: grpc.RpcError) -> Optional[int]:
    """The pause the regulator asks for before a retry (its ``RETRY_AFTER_KEY`` trailing
    metadata), or None if the answer is not a "retry later"."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0, int(value))
            except (TypeError, ValueError):
                return 0  # the key decides; a garbled pause is no pause
    return None


def is_shed(code: grpc.StatusCode, retry_after: Optional[int]) -> bool:
    """Whether a RESOURCE_EXHAUSTED is about load (retry later), not a quota (never retried):
    decided by the status's ``RETRY_AFTER_KEY`` alone, never by its text. Every shed answer of
    the regulator carries the key (its admission limit, its history-read slots, a step or epoch
    refused for the memory budget); a quota (too many sessions, modalities or bytes) and grpcio's own RESOURCE_EXHAUSTED (a message over the
    size limit) do not."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is not None


def from_rpc_error(exc: grpc.RpcError) -> RegulatorError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if is_shed(code, retry_after_ms(exc)):
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
