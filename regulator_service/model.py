"""Domain records of the regulator: what a session is configured with, what a step reported and
what was answered, what an epoch accumulated. Immutable values; no gRPC, no I/O."""

from __future__ import annotations

import hashlib
import math
import operator
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeVar, Union

from .policy import SessionProfile, Window


class Fallback(IntEnum):
    """Mirrors ``inforeg.regulator.v1.Fallback``."""

    NONE = 0
    NEUTRAL = 1
    LAST = 2


class SessionStatus(IntEnum):
    """Mirrors ``inforeg.regulator.v1.SessionState``."""

    OPEN = 1
    CLOSED = 2
    SUPERSEDED = 3
    EXPIRED = 4
    CORRUPT = 5  # quarantined: its stored records cannot be decoded (see ``Quarantine``)


@dataclass(frozen=True)
class SessionKey:
    job_id: str
    attempt: int

    def __str__(self) -> str:
        return f"{self.job_id}#{self.attempt}"


@dataclass(frozen=True)
class SessionConfig:
    job_id: str
    attempt: int
    world_size: int
    modalities: tuple[str, ...]
    profile: SessionProfile
    resume_epoch: int = 0  # > 0: inherits the previous attempt's closed epochs before this one
    # OpenSession(next_attempt) opener id: a retried request gets the attempt it created. Not
    # part of the configuration's identity (equality), so a rejoin with another token matches.
    open_token: str = field(default="", compare=False)

    @property
    def key(self) -> SessionKey:
        return SessionKey(self.job_id, self.attempt)


@dataclass(frozen=True)
class FisherTerms:
    """The three per-modality reductions of a step; see ``regulated_fisher``."""

    grad_sq: float
    grad_delta: float
    delta_sq: float


def regulated_fisher(grad_sq: float, grad_delta: float, delta_sq: float, coef: float) -> float:
    """Fisher contribution of the gradient ``g + coef*d`` from the three fused reductions.

    sum((g + a d)^2) = sum(g^2) + 2a sum(g d) + a^2 sum(d^2); a sum of squares, so rounding
    residue below zero is clamped (a NaN stays NaN, and closes the window). With ``coef == 0``
    this is exactly ``grad_sq``.
    """
    if coef == 0.0:
        return grad_sq
    value = grad_sq + 2.0 * coef * grad_delta + coef * coef * delta_sq
    return 0.0 if value < 0.0 else value


@dataclass(frozen=True)
class FisherDeferred:
    """The step's Fisher value is measured after its factors are applied and arrives later, in a
    ``MeasuredFisher`` of a later request: the answer does not depend on it, so the client
    need not wait for the answer before it can measure the gradient the optimizer applies."""


DEFERRED = FisherDeferred()
PENDING = math.nan  # the recorded fisher of a deferred step until its value arrives

FisherInput = Union[float, FisherTerms, FisherDeferred]


@dataclass(frozen=True)
class MeasuredFisher:
    """Deferred Fisher values of one step. As it arrives, ``values`` pairs modality names with
    values; the session puts them in its modality order (``fishers``)."""

    step: int
    values: tuple[tuple[str, float], ...] = ()
    fishers: tuple[float, ...] = ()


def _digest(
    epoch: int, count: int, score_sums: tuple[float, ...], fisher: tuple[FisherInput, ...]
) -> bytes:
    """Canonical fingerprint of a step's statistics: equal iff a repeated report carries the
    same statistics (what was applied on a fallback is compared separately)."""
    # one pack of the concatenated format: the same bytes as one pack per part ("<": no padding)
    fmt, values = ["<qq"], [epoch, count]
    for s, f in zip(score_sums, fisher):
        if isinstance(f, FisherTerms):
            fmt.append("cdddd")
            values += (b"t", s, f.grad_sq, f.grad_delta, f.delta_sq)
        elif isinstance(f, FisherDeferred):  # the value arrives later and is compared then
            fmt.append("cd")
            values += (b"p", s)
        else:
            fmt.append("cdd")
            values += (b"f", s, f)
    return hashlib.blake2b(struct.pack("".join(fmt), *values), digest_size=16).digest()


R = TypeVar("R")


def _evolved(record: R, **changes: object) -> R:
    """``dataclasses.replace`` for the frozen records below that have no ``__post_init__`` and
    no ``init=False`` field: a copy of the instance's fields with ``changes``, without running
    the generated ``__init__`` again. About 7x cheaper, and it runs several times per Report."""
    new = object.__new__(type(record))
    new.__dict__.update(record.__dict__, **changes)
    return new


@dataclass(frozen=True)
class ModalityReport:
    """One modality's entry of a Report as it arrived (validated for range, not for the session)."""

    modality: str
    score_sum: float
    fisher: FisherInput
    applied: float | None = None  # proximal coefficient the client applied (fallback reports)
    applied_grad_scale: float | None = None  # gradient scale it applied (None: unscaled, 1)
    applied_noise_scale: float = 0.0  # noise switch it applied


@dataclass(frozen=True)
class RawReport:
    """A Report before it is matched against its session's modalities."""

    key: SessionKey
    rank: int
    epoch: int
    step: int
    count: int
    stats: tuple[ModalityReport, ...]
    fallback: Fallback = Fallback.NONE
    measured: tuple[MeasuredFisher, ...] = ()  # deferred Fisher values, in step order


@dataclass(frozen=True)
class StepReport:
    """A validated Report, with per-modality values in the session's modality order."""

    key: SessionKey
    rank: int
    epoch: int
    step: int
    count: int
    score_sums: tuple[float, ...]
    fisher: tuple[FisherInput, ...]
    fallback: Fallback = Fallback.NONE
    applied: tuple[float, ...] | None = None  # proximal coefficients applied on fallback
    # gradient scales and noise switches applied on a 'last' fallback; () = none (1 and 0)
    applied_grad_scale: tuple[float, ...] = ()
    applied_noise_scale: tuple[float, ...] = ()
    # deferred Fisher values (session modality order) carried by this report: not part of the
    # step's statistics (digest), compared with what is recorded instead
    measured: tuple[MeasuredFisher, ...] = ()
    digest: bytes = field(init=False, repr=False, compare=False)

    @property
    def deferred(self) -> bool:
        return any(isinstance(f, FisherDeferred) for f in self.fisher)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "digest",
            _digest(self.epoch, self.count, self.score_sums, self.fisher),
        )


@dataclass(frozen=True)
class StepRecord:
    """What the regulator recorded and answered for one step."""

    epoch: int
    step: int
    count: int
    score_sums: tuple[float, ...]
    fishers: tuple[float, ...]  # after regulation
    proximal: tuple[float, ...]
    fallback: Fallback
    digest: bytes
    grad_scale: tuple[float, ...] = ()  # empty: the profile does not scale gradients (all 1)
    noise_scale: tuple[float, ...] = ()  # empty: no gradient noise (all 0)

    def scales(self) -> tuple[float, ...]:
        return self.grad_scale or tuple(1.0 for _ in self.proximal)

    @property
    def fisher_pending(self) -> bool:
        """Reported with deferred Fisher values that have not arrived (NaN is never a recorded
        value otherwise: every fisher is validated finite)."""
        return any(map(math.isnan, self.fishers))

    def with_fishers(self, fishers: tuple[float, ...]) -> "StepRecord":
        return _evolved(self, fishers=fishers)

    def regulated(self) -> tuple[bool, ...]:
        """Per modality: regulated at this step (a proximal term, or a gradient scale other than 1)."""
        if not self.grad_scale:  # all 1
            return tuple([p != 0.0 for p in self.proximal])
        return tuple([p != 0.0 or g != 1.0 for p, g in zip(self.proximal, self.grad_scale)])


@dataclass(frozen=True)
class EpochSummary:
    """One epoch's window and running statistics; ``fisher`` is Tr(F) once ``closed``."""

    epoch: int
    windows: tuple[Window, ...]
    steps: int = 0
    fallback_steps: int = 0
    fisher: tuple[float, ...] = ()
    regulated_steps: tuple[int, ...] = ()
    proximal_sum: tuple[float, ...] = ()
    proximal_max: tuple[float, ...] = ()
    score_mean_sum: tuple[float, ...] = ()  # sum over steps of the step mean score_sum / count
    closed: bool = False
    # restored from a job's checkpoint (OpenSession's snapshot) by a regulator that did not hold
    # the job: its values are the checkpoint's, not observed here
    restored: bool = False

    @classmethod
    def start(cls, epoch: int, windows: tuple[Window, ...]) -> "EpochSummary":
        zeros = tuple(0.0 for _ in windows)
        return cls(
            epoch=epoch,
            windows=windows,
            fisher=zeros,
            regulated_steps=tuple(0 for _ in windows),
            proximal_sum=zeros,
            proximal_max=zeros,
            score_mean_sum=zeros,
        )

    def add(self, rec: StepRecord) -> "EpochSummary":
        """The summary with one more step; fisher is summed in step order, as replay does. A
        pending fisher is added when it arrives (``add_fisher``), before any later step's: a
        session holds at most one pending step, its last, so the order of the sum is the same."""
        count = rec.count
        return _evolved(
            self,
            steps=self.steps + 1,
            fallback_steps=self.fallback_steps + (rec.fallback != Fallback.NONE),
            fisher=self.fisher if rec.fisher_pending else tuple(map(operator.add, self.fisher, rec.fishers)),
            regulated_steps=tuple(map(operator.add, self.regulated_steps, rec.regulated())),
            proximal_sum=tuple(map(operator.add, self.proximal_sum, rec.proximal)),
            proximal_max=tuple(map(max, self.proximal_max, rec.proximal)),
            score_mean_sum=tuple([a + s / count for a, s in zip(self.score_mean_sum, rec.score_sums)]),
        )

    def add_fisher(self, fishers: tuple[float, ...]) -> "EpochSummary":
        """The summary once the pending step's deferred fisher has arrived."""
        return _evolved(self, fisher=tuple(map(operator.add, self.fisher, fishers)))

    def close(self) -> "EpochSummary":
        return _evolved(self, closed=True)


@dataclass(frozen=True)
class SessionView:
    """A consistent snapshot of a session's header, for answers and listings."""

    config: SessionConfig
    status: SessionStatus
    epoch: int
    window: tuple[Window, ...]
    last_step: int
    steps: int
    created_ms: int
    last_active_ms: int


@dataclass(frozen=True)
class Limits:
    """Resource bounds; beyond them a request is RESOURCE_EXHAUSTED."""

    max_open_sessions: int = 1024
    max_modalities: int = 16
    inactive_cache: int = 256  # inactive sessions kept in memory (the rest is read from the store)
    session_ttl_s: float = 0.0  # idle open sessions expire after this long; 0 = never
    max_listed_inactive: int = 1000
    # bytes the session caches may hold (answers, sessions, history pages; memory_budget.py)
    memory_budget: int = 256 << 20
    # step records of sessions ended longer ago than this are pruned (epochs kept); 0 = never
    step_retention_s: float = 0.0
    store_timeout_s: float = 2.0  # a store call (or a wait for a busy session) taking longer is UNAVAILABLE
    # history pages (GetSession with steps): bytes/s sent at most (0 = unpaced), reads at once
    # (0 = unbounded); read_pacing.py says why
    history_read_rate: int = 32 << 20
    max_history_readers: int = 2

