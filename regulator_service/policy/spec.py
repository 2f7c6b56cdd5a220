"""What a regulation profile is, declared once, next to its policy.

A policy module declares one ``ProfileSpec``: its name, its parameters (a frozen dataclass whose
field defaults are the only place a default is written, each field carrying its valid range),
its policy factory, its modality rules and any cross-parameter check. Everything else - the wire
converters, the store codec, the client's ``make_profile``, the CLI flags and ``choices=`` - is
derived from the specs a ``ProfileRegistry`` collects, so a new profile is one new module.

Nothing here knows about gRPC or protobuf; a plugin's spec names its parameter message class,
which only ``regulator_service.wire.profile_wire`` looks inside.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from .base import Policy, ProximalPolicy

# Epoch numbers (warm-up, modulation ranges) must survive JSON and float64 exactly.
MAX_EPOCH = 2**53 - 1
# beta, gains and alpha scale exp(.) or tanh(.): bounded so every coefficient stays finite
# (at most exp(100) for paper, 100 * e for official).
MAX_STRENGTH = 100.0

_META = "inforeg.param"


class ProfileError(ValueError):
    """A profile or a parameter a server or client cannot accept; the message names it."""


def quoted(value: Any, limit: int = 64) -> str:
    """A caller-supplied value as messages show it: repr'd and cut, so no message grows with
    the request."""
    text = repr(value)
    return text[:limit] + ("..." if len(text) > limit else "")


@dataclass(frozen=True)
class Bounds:
    """The valid range of one numeric parameter, and why it is the range."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""
    choices: tuple[str, ...] = ()  # a str parameter's valid values (empty: any string)

    def contains(self, x: float) -> bool:
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        if self.high is not None and (x > self.high or (self.high_open and x == self.high)):
            return False
        return True

    def describe(self) -> str:
        lo = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{_num(self.low)}"
        hi = "inf)" if self.high is None else f"{_num(self.high)}{')' if self.high_open else ']'}"
        return f"{lo}, {hi}"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def param(default: Any, help: str, **bounds: Any) -> Any:
    """A parameter field: its default, a one-line help, and its ``Bounds`` (low, high, ...)."""
    return dataclasses.field(default=default, metadata={_META: (help, Bounds(**bounds))})


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as the converters and CLIs see it."""

    name: str
    kind: type  # float, int, bool or str
    optional: bool  # None is a value (e.g. an unbounded end_epoch)
    default: Any
    help: str
    bounds: Bounds


_KINDS = (float, int, bool, str)


@functools.lru_cache(maxsize=None)
def parameters_of(params_type: type) -> tuple[ParamInfo, ...]:
    """The parameters a Params dataclass declares, in declaration order (a pure function of the
    class, so cached: it runs for every profile a session answers with)."""
    hints = typing.get_type_hints(params_type)
    out = []
    for f in dataclasses.fields(params_type):
        hint = hints[f.name]
        optional = False
        if typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional, hint = True, args[0] if len(args) == 1 else hint
        if hint not in _KINDS:
            raise ProfileError(f"{params_type.__name__}.{f.name}: type {hint!r} is not one of float, int, bool, str")
        help_, bounds = f.metadata.get(_META, ("", Bounds()))
        out.append(ParamInfo(f.name, hint, optional, f.default, help_, bounds))
    return tuple(out)


def _typed(info: ParamInfo, value: Any, where: str) -> Any:
    """``value`` as the parameter's type; ints are accepted for floats, bools never for numbers."""
    if value is None:
        if info.optional:
            return None
        raise ProfileError(f"{where} must be set")
    ok = isinstance(value, info.kind) and not (info.kind is not bool and isinstance(value, bool))
    if info.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ProfileError(f"{where} must be {info.kind.__name__}, got {quoted(value)}")
    return value + 0.0 if info.kind is float else value  # -0.0 is stored as 0.0


def _check_range(info: ParamInfo, value: Any, where: str) -> None:
    if info.kind is str and info.bounds.choices and value not in info.bounds.choices:
        raise ProfileError(f"{where} must be one of {list(info.bounds.choices)}, got {quoted(value)}")
    if value is None or info.kind in (bool, str):
        return
    if info.kind is float and not math.isfinite(value):
        raise ProfileError(f"{where} must be finite, got {value}")
    if not info.bounds.contains(value):
        why = f" ({info.bounds.why})" if info.bounds.why else ""
        raise ProfileError(f"{where} must be in {info.bounds.describe()}, got {value!r}{why}")


@dataclass(frozen=True)
class ProfileSpec:
    """Everything the regulator needs to know about one profile.

    ``oneof`` names the ``Profile`` oneof member of a built-in profile; a plugin profile leaves
    it empty and gives ``message``, its parameter message class, which travels packed in
    ``Profile.plugin`` (its type URL names the profile). ``check(params, modalities)`` enforces
    rules across parameters and modalities and may fill modality-dependent defaults; it returns
    the resolved params or raises ``ProfileError``.
    """

    name: str
    params: type
    policy: Callable[[Any, tuple[str, ...]], Policy]
    summary: str
    min_modalities: int = 2
    max_modalities: Optional[int] = None
    check: Optional[Callable[[Any, tuple[str, ...]], Any]] = None
    oneof: Optional[str] = None
    message: Optional[type] = None

    def parameters(self) -> tuple[ParamInfo, ...]:
        return parameters_of(self.params)

    @property
    def scales_gradients(self) -> bool:
        """Whether the policy may answer gradient scales or noise; a ``ProximalPolicy`` answers
        only proximal coefficients (the client logs scales only where they can vary)."""
        return not (isinstance(self.policy, type) and issubclass(self.policy, ProximalPolicy))

    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters())

    def _known(self, given: Mapping[str, Any]) -> None:
        unknown = sorted(set(given) - set(self.param_names()))
        if unknown:
            raise ProfileError(
                f"profile {self.name!r} has no parameter(s) {quoted(unknown)}; it takes {list(self.param_names())}"
            )

    def resolve(self, given: Mapping[str, Any], modalities: tuple[str, ...]) -> "SessionProfile":
        """Validates ``given`` parameters (unset ones take their defaults) for a session."""
        self._known(given)
        n = len(modalities)
        if n < self.min_modalities or (self.max_modalities is not None and n > self.max_modalities):
            if self.max_modalities == self.min_modalities:
                need = f"exactly {self.min_modalities}"
            elif self.max_modalities is None:
                need = f"at least {self.min_modalities}"
            else:
                need = f"{self.min_modalities} to {self.max_modalities}"
            raise ProfileError(f"profile {self.name!r} needs {need} modalities, got {n}")
        values = {}
        for info in self.parameters():
            where = f"{self.name}.{info.name}"
            value = _typed(info, given[info.name], where) if info.name in given else info.default
            _check_range(info, value, where)
            values[info.name] = value
        params = self.params(**values)
        if self.check is not None:
            params = self.check(params, modalities)
        return SessionProfile(self, params)

    def restore(self, stored: Mapping[str, Any]) -> "SessionProfile":
        """Rebuilds the params of a stored session as they were accepted (no range check, so a
        session accepted by an older, laxer server keeps loading; a parameter added since takes
        its default)."""
        self._known(stored)
        return SessionProfile(self, self.params(**stored))


@dataclass(frozen=True)
class SessionProfile:
    """The profile a session runs with: its spec and its resolved parameters."""

    spec: ProfileSpec
    params: Any

    @property
    def name(self) -> str:
        return self.spec.name

    def policy(self, modalities: tuple[str, ...]) -> Policy:
        return self.spec.policy(self.params, modalities)

    def values(self) -> dict[str, Any]:
        return {info.name: getattr(self.params, info.name) for info in self.spec.parameters()}
