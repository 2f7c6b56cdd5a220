"""Wire <-> domain: validates requests field by field and builds answers.

Everything a request can get wrong on its own (ranges, NaN, names, missing fields) is rejected
here with INVALID_ARGUMENT before any session is touched; what depends on a session (unknown
modality, step order) is checked by the session.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional

from inforeg.regulator.v1 import regulator_pb2 as pb

from ..errors import InvalidArgument, ResourceExhausted, shown
from ..model import (
    DEFERRED,
    EpochSummary,
    Fallback,
    FisherInput,
    FisherTerms,
    Limits,
    MeasuredFisher,
    ModalityReport,
    RawReport,
    SessionConfig,
    SessionKey,
    SessionView,
    StepRecord,
)
from . import profile_wire
from ..policy import BUILTIN_PROFILES, MAX_STRENGTH, ProfileError, ProfileRegistry, SessionProfile, Window
from ..storage.base import Quarantined

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,199}")
MODALITY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
OPEN_TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


# Step, epoch and attempt numbers stay below 2^53: every JSON reader (float64) reads them exactly.
MAX_INDEX = (1 << 53) - 1


def _finite(name: str, x: float, *, nonneg: bool = False, of: Optional[str] = None) -> float:
    """``x`` if finite (and >= 0 with ``nonneg``), with -0.0 normalised to 0.0 so that equal
    statistics have one stored form and one digest. ``of``: the modality the value belongs to,
    quoted in the message (built only on failure: this runs for every field of every Report)."""
    if not math.isfinite(x) or (nonneg and x < 0.0):
        label = name if of is None else f"{name} of {shown(of)}"
        if not math.isfinite(x):
            raise InvalidArgument(f"{label} must be finite, got {x}")
        raise InvalidArgument(f"{label} must be >= 0, got {x}")
    return float(x) + 0.0  # -0.0 + 0.0 == +0.0 in IEEE 754


def _index(name: str, x: int, low: int = 0) -> int:
    """A step, epoch, attempt or count: an integer in [low, 2^53)."""
    if not low <= x <= MAX_INDEX:
        raise InvalidArgument(f"{name} must be in [{low}, 2^53 - 1], got {x}")
    return int(x)


def _at_least(name: str, x: int, low: int) -> int:
    if x < low:
        raise InvalidArgument(f"{name} must be >= {low}, got {x}")
    return int(x)


def job_id(value: str) -> str:
    if not JOB_ID.fullmatch(value):
        raise InvalidArgument(
            f"job_id {shown(value)} is invalid: 1-200 characters of [A-Za-z0-9._:@/+=-], "
            "starting with a letter or digit"
        )
    return value


def epoch_number(epoch: int) -> int:
    return _index("epoch", epoch)


def session_key(job: str, attempt: int) -> SessionKey:
    return SessionKey(job_id(job), _index("attempt", attempt))


# -- profiles ---------------------------------------------------------------------------------


def profile_from_proto(
    p: Optional[pb.Profile], modalities: tuple[str, ...], profiles: ProfileRegistry = BUILTIN_PROFILES
) -> SessionProfile:
    """A request's profile, validated; ``None`` (absent) is the default profile. A present
    profile whose kind is unset or unknown here, or any parameter out of range, is
    INVALID_ARGUMENT with a message naming it."""
    try:
        return profile_wire.profile_from_proto(p, modalities, profiles)
    except ProfileError as exc:
        raise InvalidArgument(str(exc)) from None


def profile_to_proto(profile: SessionProfile) -> pb.Profile:
    return profile_wire.profile_to_proto(profile)


# -- requests ---------------------------------------------------------------------------------


def config_from_request(
    req: pb.OpenSessionRequest, limits: Limits, profiles: ProfileRegistry = BUILTIN_PROFILES
) -> SessionConfig:
    key = session_key(req.job_id, req.attempt)
    world_size = req.world_size or 1
    _at_least("world_size", world_size, 1)
    modalities = tuple(req.modalities)
    if len(modalities) > limits.max_modalities:
        raise ResourceExhausted(
            f"{len(modalities)} modalities exceed the limit of {limits.max_modalities}"
        )
    for m in modalities:
        if not MODALITY.fullmatch(m):
            raise InvalidArgument(
                f"modality name {shown(m)} is invalid: 1-64 characters of [A-Za-z0-9_.-]"
            )
    if len(set(modalities)) != len(modalities):
        raise InvalidArgument(f"modality names must be unique, got {list(modalities)}")
    if len(modalities) < 2:
        raise InvalidArgument(f"a session needs at least 2 modalities, got {len(modalities)}")
    return SessionConfig(
        job_id=key.job_id,
        attempt=key.attempt,
        world_size=world_size,
        modalities=modalities,
        profile=profile_from_proto(req.profile if req.HasField("profile") else None, modalities, profiles),
        resume_epoch=_index("resume_epoch", req.resume_epoch),
        open_token=_open_token(req),
    )


# A snapshot restores at most this many epochs (a 1 MiB request holds about 8,000 of two
# modalities; a job with more needs a regulator that keeps its state).
MAX_SNAPSHOT_EPOCHS = 10_000
SCORE_MEAN_SLACK = 1e-6  # a mean true-class probability may exceed 1 by float rounding, not more


def snapshot_from_request(
    req: pb.OpenSessionRequest, config: SessionConfig, profiles: ProfileRegistry = BUILTIN_PROFILES
) -> tuple[EpochSummary, ...]:
    """The closed epochs an OpenSession's ``snapshot`` restores, validated field by field against
    the request it came with (INVALID_ARGUMENT, nothing touched): the same modalities and
    profile, exactly the epochs 0 .. resume_epoch - 1, finite statistics in range. Whether its
    windows are the profile's is checked with the policy (``restore.check_windows``)."""
    snap = req.snapshot
    n = config.resume_epoch
    if n == 0:
        raise InvalidArgument("a snapshot restores the epochs before resume_epoch: set resume_epoch > 0")
    if n > MAX_SNAPSHOT_EPOCHS:
        raise InvalidArgument(f"a snapshot restores at most {MAX_SNAPSHOT_EPOCHS} epochs, resume_epoch is {n}")
    if tuple(snap.modalities) != config.modalities:
        raise InvalidArgument(
            f"the snapshot's modalities {list(snap.modalities)} differ from the session's {list(config.modalities)}"
        )
    profile = profile_from_proto(snap.profile if snap.HasField("profile") else None, config.modalities, profiles)
    if profile != config.profile:
        raise InvalidArgument(
            f"the snapshot's profile ({profile.name} {profile.values()}) differs from the session's "
            f"({config.profile.name} {config.profile.values()})"
        )
    if len(snap.epochs) != n:
        raise InvalidArgument(f"the snapshot holds {len(snap.epochs)} epoch(s); resuming at epoch {n} needs epochs 0..{n - 1}")
    return tuple(_restored_epoch(i, e, config.modalities) for i, e in enumerate(snap.epochs))


def _restored_epoch(i: int, e: pb.EpochRecord, modalities: tuple[str, ...]) -> EpochSummary:
    if e.epoch != i:
        raise InvalidArgument(f"snapshot epoch {i} is numbered {e.epoch}: the epochs must be 0, 1, ... without gaps")
    if not e.closed:
        raise InvalidArgument(f"snapshot epoch {i} is not closed")
    steps = _index(f"steps of snapshot epoch {i}", e.steps)
    if not 0 <= e.fallback_steps <= steps:
        raise InvalidArgument(f"fallback_steps of snapshot epoch {i} must be in [0, {steps}], got {e.fallback_steps}")
    names = tuple(m.modality for m in e.modalities)
    if names != modalities:
        raise InvalidArgument(f"snapshot epoch {i} has modalities {list(names)}, the session {list(modalities)}")
    windows, fisher, regulated, prox_sum, prox_max, score_sum = [], [], [], [], [], []
    for m in e.modalities:
        what = f"of {shown(m.modality)} in snapshot epoch {i}"
        w = m.window
        if w.modality not in ("", m.modality):
            raise InvalidArgument(f"the window {what} names modality {shown(w.modality)}")
        if math.isinf(w.growth):
            raise InvalidArgument(f"the window growth {what} must be finite or NaN (undefined), got {w.growth}")
        if not 0 <= m.regulated_steps <= steps:
            raise InvalidArgument(f"regulated_steps {what} must be in [0, {steps}], got {m.regulated_steps}")
        mean_score = _finite(f"mean_score {what}", m.mean_score, nonneg=True)
        if mean_score > 1.0 + SCORE_MEAN_SLACK:
            raise InvalidArgument(f"mean_score {what} is a mean probability, at most 1; got {mean_score}")
        windows.append(Window(open=w.open, growth=w.growth))
        fisher.append(_finite(f"fisher_trace {what}", m.fisher_trace, nonneg=True))
        regulated.append(int(m.regulated_steps))
        # the epoch keeps sums (mean x steps), which must stay finite like every recorded value
        mean_proximal = _finite(f"mean_proximal {what}", m.mean_proximal, nonneg=True)
        prox_sum.append(_finite(f"mean_proximal x steps {what}", mean_proximal * steps))
        prox_max.append(_finite(f"max_proximal {what}", m.max_proximal, nonneg=True))
        score_sum.append(mean_score * steps)
    return EpochSummary(
        epoch=i, windows=tuple(windows), steps=steps, fallback_steps=int(e.fallback_steps), fisher=tuple(fisher),
        regulated_steps=tuple(regulated), proximal_sum=tuple(prox_sum), proximal_max=tuple(prox_max),
        score_mean_sum=tuple(score_sum), closed=True, restored=True,
    )


def _open_token(req: pb.OpenSessionRequest) -> str:
    """The opener's token; only with ``next_attempt``, whose ``attempt`` the server assigns."""
    if not req.next_attempt:
        if req.open_token:
            raise InvalidArgument("open_token is only meaningful with next_attempt")
        return ""
    if req.attempt != 0:
        raise InvalidArgument(f"attempt must be 0 with next_attempt (the server assigns it), got {req.attempt}")
    if req.open_token and not OPEN_TOKEN.fullmatch(req.open_token):
        raise InvalidArgument(f"open_token {shown(req.open_token)} is invalid: 1-128 characters of [A-Za-z0-9_.:-]")
    return req.open_token


def _modality_report(s: pb.ModalityStats, fallback: Fallback) -> ModalityReport:
    name = s.modality
    score = _finite("score_sum", s.score_sum, nonneg=True, of=name)
    source = s.WhichOneof("fisher_source")
    fisher: FisherInput
    if source == "fisher_deferred":
        if not s.fisher_deferred:
            raise InvalidArgument(f"fisher_deferred of {shown(name)} is false: leave it unset, or send fisher")
        fisher = DEFERRED
    elif source == "fisher":
        fisher = _finite("fisher", s.fisher, nonneg=True, of=name)
    elif source == "fisher_terms":
        t = s.fisher_terms
        fisher = FisherTerms(
            grad_sq=_finite("fisher_terms.grad_sq", t.grad_sq, nonneg=True, of=name),
            grad_delta=_finite("fisher_terms.grad_delta", t.grad_delta, of=name),
            delta_sq=_finite("fisher_terms.delta_sq", t.delta_sq, nonneg=True, of=name),
        )
    else:
        raise InvalidArgument(f"modality {shown(name)} carries neither fisher, fisher_terms nor fisher_deferred")
    applied: Optional[float] = None
    grad_scale: Optional[float] = None
    noise_scale = 0.0
    if s.HasField("applied"):
        applied = _finite("applied.proximal", s.applied.proximal, nonneg=True, of=name)
        if s.applied.HasField("grad_scale"):
            grad_scale = _finite("applied.grad_scale", s.applied.grad_scale, nonneg=True, of=name)
        noise_scale = _finite("applied.noise_scale", s.applied.noise_scale, nonneg=True, of=name)
    return ModalityReport(name, score, fisher, applied, grad_scale, noise_scale)


def report_from_request(req: pb.ReportRequest) -> RawReport:
    """Field-by-field validation of a Report (what needs the session is checked by it)."""
    fallback = _FALLBACKS.get(req.fallback)
    if fallback is None:
        raise InvalidArgument(f"unknown fallback value {req.fallback}")
    measured = req.measured
    return RawReport(
        session_key(req.job_id, req.attempt),
        _index("rank", req.rank),
        _index("epoch", req.epoch),
        _index("step", req.step),
        _index("count", req.count, 1),
        tuple([_modality_report(s, fallback) for s in req.stats]),
        fallback,
        tuple([measured_from_proto(m) for m in measured]) if measured else (),
    )


_FALLBACKS = {int(f): f for f in Fallback}  # a dict lookup: cheaper than Fallback(value) on every Report


def measured_from_proto(m: pb.MeasuredFisher) -> MeasuredFisher:
    """Deferred Fisher values of one step (matched to the session's modalities by the session)."""
    step = _index("measured.step", m.step)
    values = tuple([(e.modality, e.fisher) for e in m.modalities])
    for name, value in values:
        if not (value >= 0.0 and value < math.inf):  # NaN, inf or negative: the message is built only then
            _finite(f"measured fisher of {shown(name)} at step {step}", value, nonneg=True)
    return MeasuredFisher(step, tuple([(name, value + 0.0) for name, value in values]))


# -- answers ----------------------------------------------------------------------------------


def windows_to_proto(modalities: Iterable[str], windows: Iterable[Window]) -> list[pb.ModalityWindow]:
    return [pb.ModalityWindow(modality=m, open=w.open, growth=w.growth) for m, w in zip(modalities, windows)]


def session_info(view: SessionView) -> pb.SessionInfo:
    c = view.config
    return pb.SessionInfo(
        job_id=c.job_id,
        attempt=c.attempt,
        world_size=c.world_size,
        modalities=list(c.modalities),
        profile=profile_to_proto(c.profile),
        state=int(view.status),
        epoch=view.epoch,
        last_step=view.last_step,
        steps=view.steps,
        window=windows_to_proto(c.modalities, view.window),
        created_unix_ms=view.created_ms,
        last_active_unix_ms=view.last_active_ms,
        resume_epoch=c.resume_epoch,
    )


def quarantined_info(q: Quarantined) -> pb.SessionInfo:
    """A quarantined session as listed: what is known without decoding its records."""
    return pb.SessionInfo(
        job_id=q.key.job_id,
        attempt=q.key.attempt,
        state=pb.SESSION_STATE_CORRUPT,
        state_reason=f"its stored records cannot be decoded: {q.reason}",
        created_unix_ms=q.created_ms,
        last_active_unix_ms=q.last_active_ms,
        last_step=-1,
    )


def factors(r: StepRecord, i: int) -> pb.Factors:
    """Modality i's factors; ``grad_scale`` stays absent (= 1) for profiles that never scale."""
    f = pb.Factors(proximal=r.proximal[i])
    if r.grad_scale:
        f.grad_scale = r.grad_scale[i]
    if r.noise_scale:
        f.noise_scale = r.noise_scale[i]
    return f


def step_record(modalities: tuple[str, ...], r: StepRecord) -> pb.StepRecord:
    if r.grad_scale or r.noise_scale:
        per = [factors(r, i) for i in range(len(modalities))]
    else:  # the common case, built without a call per modality (this runs for every Report)
        per = [pb.Factors(proximal=a) for a in r.proximal]
    return pb.StepRecord(
        epoch=r.epoch,
        step=r.step,
        count=r.count,
        modalities=[
            pb.ModalityStep(modality=m, score_sum=s, fisher=f, factors=k)
            for m, s, f, k in zip(modalities, r.score_sums, r.fishers, per)
        ],
        fallback=int(r.fallback),
    )


def epoch_record(modalities: tuple[str, ...], e: EpochSummary) -> pb.EpochRecord:
    n = e.steps
    return pb.EpochRecord(
        epoch=e.epoch,
        closed=e.closed,
        steps=n,
        fallback_steps=e.fallback_steps,
        modalities=[
            pb.ModalityEpoch(
                modality=m,
                fisher_trace=e.fisher[i],
                window=pb.ModalityWindow(modality=m, open=e.windows[i].open, growth=e.windows[i].growth),
                regulated_steps=e.regulated_steps[i],
                mean_proximal=e.proximal_sum[i] / n if n else 0.0,
                max_proximal=e.proximal_max[i],
                mean_score=e.score_mean_sum[i] / n if n else 0.0,
            )
            for i, m in enumerate(modalities)
        ],
        restored=e.restored,
    )

