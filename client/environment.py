"""Switches a training job obeys without code changes, read from the environment.

Operations can turn a fleet of jobs fail-open or off the way ``WANDB_MODE`` does for W&B:

- ``REGULATOR_ON_UNAVAILABLE=wait|neutral|last``: the delivery mode when the code passes none
  (an explicit ``on_unavailable=`` argument wins);
- ``REGULATOR_DISABLED=1`` (``true``/``yes``/``on``): the hook makes no connection and applies
  nothing; the gradients are those of plain training;
- ``REGULATOR_REPORT_STREAM=off`` (``0``/``false``/``no``): Reports go as unary calls instead of
  the messages of one stream per job (read by ``GrpcTransport`` when it is built; default on).

``InfoRegHook`` reads them when it is built, and the Lightning, Hugging Face and Accelerate
integrations all build one, so every way in obeys the same switches. Nothing is cached: a
process that changes its environment gets the new values in the next hook it builds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from .delivery import MODES

ON_UNAVAILABLE = "REGULATOR_ON_UNAVAILABLE"
DISABLED = "REGULATOR_DISABLED"
REPORT_STREAM = "REGULATOR_REPORT_STREAM"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class ClientEnvironment:
    """The switches as read at one moment; ``None``: not set."""

    on_unavailable: Optional[str] = None
    disabled: bool = False

    @classmethod
    def read(cls, env: Optional[Mapping[str, str]] = None) -> "ClientEnvironment":
        """From ``env`` (default ``os.environ``); a bad value is a ``ValueError`` naming the
        variable and what it may be."""
        env = os.environ if env is None else env
        mode = env.get(ON_UNAVAILABLE, "").strip().lower() or None
        if mode is not None and mode not in MODES:
            raise ValueError(f"{ON_UNAVAILABLE}={env[ON_UNAVAILABLE]!r}: expected one of {', '.join(MODES)}")
        return cls(on_unavailable=mode, disabled=_switch(env, DISABLED, default=False))

    def mode(self, explicit: Optional[str]) -> str:
        """The delivery mode in force: the code's argument, else the environment's, else ``wait``."""
        if explicit is not None:
            return explicit
        return self.on_unavailable or "wait"


def report_stream_enabled(env: Optional[Mapping[str, str]] = None) -> bool:
    """``REGULATOR_REPORT_STREAM`` from ``env`` (default ``os.environ``): on unless ``off`` (or
    ``0``/``false``/``no``); any other value is a ``ValueError`` naming the variable."""
    return _switch(os.environ if env is None else env, REPORT_STREAM, default=True)


def _switch(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    """An on/off variable: 1/true/yes/on or 0/false/no/off, ``default`` when unset or empty."""
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in _TRUE or raw in _FALSE:
        return raw in _TRUE
    raise ValueError(f"{name}={env[name]!r}: expected 1/true/yes/on or 0/false/no/off (or unset)")
