"""A Report's validation apart from the session's state: its entries matched to the session's
modalities, its fallback's applied factors, and the float64 overflow checks of what it records.

Pure functions of the request and the session's configuration; ``Session`` calls them while
planning a step.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

from ..errors import InvalidArgument, shown
from ..model import EpochSummary, Fallback, FisherDeferred, FisherTerms, ModalityReport, RawReport, SessionConfig, StepRecord, StepReport
from . import pending

SCORE_SLACK = 1e-6  # a score sum may exceed count by float rounding, not more


def applied_scales(entries: Iterable[ModalityReport]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The gradient scales and noise switches a fallback applied, in modality order; each is ()
    when it is neutral everywhere (scale 1, noise 0), as a profile that never scales records."""
    entries = list(entries)
    scales = tuple(1.0 if e.applied_grad_scale is None else e.applied_grad_scale for e in entries)
    noise = tuple(e.applied_noise_scale for e in entries)
    return (scales if any(k != 1.0 for k in scales) else ()), (noise if any(n != 0.0 for n in noise) else ())


def same_applied(rep: StepReport, prior: StepRecord) -> bool:
    """A repeated fallback report applied exactly what the recorded one did."""
    return (rep.applied, rep.applied_grad_scale, rep.applied_noise_scale) == (
        prior.proximal, prior.grad_scale, prior.noise_scale
    )


def normalize(cfg: SessionConfig, index: Mapping[str, int], raw: RawReport) -> StepReport:
    """Matches a report's entries to the session's modalities (``index``: name -> position;
    semantic validation)."""
    if raw.rank >= cfg.world_size:
        raise InvalidArgument(f"rank {raw.rank} is outside world_size {cfg.world_size}")
    slots: list[Optional[ModalityReport]] = [None] * len(cfg.modalities)
    bound = raw.count * (1.0 + SCORE_SLACK)
    for entry in raw.stats:
        i = index.get(entry.modality)
        if i is None:
            raise InvalidArgument(
                f"unknown modality {shown(entry.modality)}; session has {list(cfg.modalities)}"
            )
        if slots[i] is not None:
            raise InvalidArgument(f"modality {shown(entry.modality)} reported twice")
        if entry.score_sum > bound:
            raise InvalidArgument(
                f"score_sum {entry.score_sum} of {shown(entry.modality)} exceeds count {raw.count}: "
                "it must be a sum of probabilities"
            )
        slots[i] = entry
    if len(raw.stats) < len(slots):  # each entry took its own slot (a second one is refused above)
        raise InvalidArgument(f"missing modalities {[m for m, e in zip(cfg.modalities, slots) if e is None]}")
    entries: list[ModalityReport] = slots  # type: ignore[assignment]  # all set now
    applied: Optional[tuple[float, ...]] = None
    scales: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())
    if raw.fallback == Fallback.NONE:
        for e in entries:
            if e.applied is not None:
                raise InvalidArgument("'applied' factors are only accepted with a fallback")
    elif raw.fallback == Fallback.NEUTRAL:
        applied = tuple(0.0 for _ in entries)
        if any(e.applied not in (None, 0.0) for e in entries):
            raise InvalidArgument("a neutral fallback applies zero coefficients")
        if applied_scales(entries) != ((), ()):
            raise InvalidArgument("a neutral fallback applies no gradient scale (1) and no noise (0)")
    else:
        if any(e.applied is None for e in entries):
            raise InvalidArgument("a 'last' fallback must send the applied factors")
        applied = tuple(e.applied for e in entries)  # type: ignore[misc]
        scales = applied_scales(entries)
    return StepReport(
        key=raw.key,
        rank=raw.rank,
        epoch=raw.epoch,
        step=raw.step,
        count=raw.count,
        score_sums=tuple([e.score_sum for e in entries]),
        fisher=tuple([e.fisher for e in entries]),
        fallback=raw.fallback,
        applied=applied,
        applied_grad_scale=scales[0],
        applied_noise_scale=scales[1],
        measured=pending.in_order(raw.measured, index, cfg.modalities) if raw.measured else (),
    )


def require_finite(mods: Sequence[str], rep: StepReport, record: StepRecord, summary: EpochSummary) -> None:
    """Finite inputs can still overflow float64 where they meet: the regulated Fisher value
    (a term of g^2 + 2a gd + a^2 d^2 near 1e308 becomes inf, and the sum NaN or a clamped 0)
    and the epoch's running sums (two steps of 1.7e308). Such a report is INVALID_ARGUMENT
    and changes nothing, so no record, trace or window is ever non-finite."""
    for m, f, a, value in zip(mods, rep.fisher, record.proximal, record.fishers):
        if value != value and isinstance(f, FisherDeferred):
            continue  # pending: checked when it arrives
        terms = (f.grad_sq, 2.0 * a * f.grad_delta, a * a * f.delta_sq) if a and isinstance(f, FisherTerms) else ()
        if not math.isfinite(value) or (terms and not all(math.isfinite(t) for t in terms)):
            raise InvalidArgument(
                f"the regulated Fisher value of {shown(m)} at step {record.step} overflows float64 "
                f"with proximal coefficient {a:g}: report smaller fisher_terms"
            )
    sums = (("Fisher trace", summary.fisher), ("proximal coefficient sum", summary.proximal_sum),
            ("score sum", summary.score_mean_sum))
    for what, values in sums:
        for m, v in zip(mods, values):
            if not math.isfinite(v):
                raise InvalidArgument(
                    f"step {record.step} would make epoch {summary.epoch}'s {what} of {shown(m)} "
                    f"overflow float64 ({v})"
                )
