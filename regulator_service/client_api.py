"""Everything the client library (``regulator_client``) takes from the service, in one place.

The client needs the service for three things only: the wire contract beside the generated stubs
(domain errors and their status codes, the structural "retry later" key, profile declarations and
their wire encoding), the bearer-token and TLS-file helpers it shares with the server, and the
in-process mode (the server's API object run inside the training process). ``tests/test_layout.py``
checks that ``client/`` imports from ``regulator_service`` through this module only, so the
service's rooms can move without touching the client. Keep it small: names, no logic.

The in-process API is built lazily (``build_api``): importing this module does not load the
store, the sessions or the metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .wire import profile_wire
from .errors import (
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
    RetryLater,
    Unauthenticated,
    Unavailable,
    error_for_code,
)
from .policy import BUILTIN_PROFILES, ProfileError, ProfileRegistry, ProfileSpec
from .edge.security import FileWatch, TokenSource, token_from_env

if TYPE_CHECKING:
    from .wire.api import RegulatorAPI as RegulatorAPI  # a type only: the in-process API object


def build_api(**kwargs: Any) -> "RegulatorAPI":
    """The server's API object for the in-process mode (``api.build_api``'s arguments)."""
    from .wire.api import build_api as build

    return build(**kwargs)


__all__ = [
    "BUILTIN_PROFILES",
    "RETRY_AFTER_KEY",
    "AlreadyExists",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FileWatch",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "ProfileError",
    "ProfileRegistry",
    "ProfileSpec",
    "RegulatorError",
    "ResourceExhausted",
    "RetryLater",
    "TokenSource",
    "Unauthenticated",
    "Unavailable",
    "build_api",
    "error_for_code",
    "profile_wire",
    "token_from_env",
]
