"""Domain errors, each tied to the gRPC status code it travels as.

The servicer maps them onto status codes; the client library maps status codes back onto the
same classes, so a caller catches ``InvalidArgument`` whether it talks to a server or runs the
policy in-process.
"""

from __future__ import annotations

from typing import Optional

import grpc


def shown(text: str, limit: int = 64) -> str:
    """A client-supplied string as error messages quote it: repr'd and cut, so that a message
    never grows with the request (gRPC refuses status messages beyond 16 KiB of metadata)."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


class RegulatorError(Exception):
    """Base class; ``code`` is the gRPC status the error is sent as. An error that may go away
    by itself sets ``retry_after_ms``: it is sent with ``RETRY_AFTER_KEY``, the structural
    "retry later" a client decides on (``RetryLater``; another replica's job)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    retry_after_ms: Optional[int] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RegulatorError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RegulatorError, KeyError):
    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class AlreadyExists(RegulatorError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RegulatorError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(RegulatorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RetryLater(ResourceExhausted):
    """Refused for load, not for a quota: nothing happened, and the same call may be retried.

    Sent with the trailing-metadata key ``RETRY_AFTER_KEY`` (milliseconds to wait first), which
    is what a client decides on; the message stays for people.
    """

    def __init__(self, message: str, retry_after_ms: int = 50) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


# Trailing-metadata key of a ``RetryLater`` answer: its value is the suggested pause in ms.
RETRY_AFTER_KEY = "inforeg-retry-after-ms"


class Unavailable(RegulatorError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(RegulatorError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(RegulatorError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(RegulatorError):
    code = grpc.StatusCode.INTERNAL


class DataLoss(RegulatorError):
    """Stored records of the session cannot be decoded: it is quarantined, its rows untouched."""

    code = grpc.StatusCode.DATA_LOSS


ERRORS_BY_CODE: dict[grpc.StatusCode, type[RegulatorError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Unauthenticated,
        DeadlineExceeded,
        Internal,
        DataLoss,
    )
}


def error_for_code(code: grpc.StatusCode, message: str) -> RegulatorError:
    """The domain error for a status code (``RegulatorError`` with that code if unmapped)."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    err = RegulatorError(message)
    err.code = code
    return err
