"""InfoReg regulator client: talk to a regulator and regulate a PyTorch training loop.

``RegulatorClient`` and the profile helpers need no torch; ``InfoRegHook`` and the statistics
helpers import torch on first use.
"""

from __future__ import annotations

from typing import Any

from .client import RegulatorClient, modality_stats
from .errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RegulatorError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .identity import JobIdentity
from .profiles import make_profile
from .trace import TraceWriter, read_trace
from .transport import GrpcTransport, InProcessTransport

_TORCH_EXPORTS = {
    "InfoRegHook": ".hook",
    "StepResult": ".hook",
    "EncoderProbe": ".stats",
    "concat_unimodal_logits": ".heads",
}


def __getattr__(name: str) -> Any:
    if name in _TORCH_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_TORCH_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "EncoderProbe",
    "FailedPrecondition",
    "GrpcTransport",
    "InProcessTransport",
    "InfoRegHook",
    "InvalidArgument",
    "JobIdentity",
    "NotFound",
    "RegulatorClient",
    "RegulatorError",
    "ResourceExhausted",
    "StepResult",
    "TraceWriter",
    "Unauthenticated",
    "Unavailable",
    "concat_unimodal_logits",
    "make_profile",
    "modality_stats",
    "read_trace",
]
