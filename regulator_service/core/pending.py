"""Deferred Fisher values: a step answered now whose Fisher value arrives with a later request.

A step's factors depend only on the epoch's window and the step's scores, so a client can report
the scores as soon as its forward pass is done and measure the Fisher value afterwards, on the
gradient the optimizer really applies (after every factor). It reports the step with
``fisher_deferred`` and sends the value in a ``MeasuredFisher`` with its next Report (or the
EndEpoch). The session records the step at once with a NaN fisher (``PENDING``) and fills it in
when the value arrives. A session holds at most one pending step, always its last: a new step
cannot be recorded before the pending one is filled, and an epoch cannot close with one. So an
epoch's trace is still summed in step order, and the history is exactly what a client that sent
every value up front would have produced.

Everything here is pure: validation and the decision what to fill; the session applies it.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, shown
from ..model import PENDING, EpochSummary, FisherDeferred, MeasuredFisher, StepRecord, StepReport


def in_order(
    measured: Sequence[MeasuredFisher], index: Mapping[str, int], modalities: Sequence[str]
) -> tuple[MeasuredFisher, ...]:
    """The entries with their values in the session's modality order; every modality exactly
    once, steps strictly increasing."""
    out = []
    last = -1
    for entry in measured:
        if entry.step <= last:
            raise InvalidArgument(f"measured Fisher values must be in increasing step order, got step {entry.step} after {last}")
        last = entry.step
        slots: list[Optional[float]] = [None] * len(modalities)
        for name, value in entry.values:
            i = index.get(name)
            if i is None:
                raise InvalidArgument(
                    f"measured Fisher of step {entry.step}: unknown modality {shown(name)}; session has {list(modalities)}"
                )
            if slots[i] is not None:
                raise InvalidArgument(f"measured Fisher of step {entry.step}: modality {shown(name)} given twice")
            slots[i] = value
        missing = [m for m, v in zip(modalities, slots) if v is None]
        if missing:
            raise InvalidArgument(f"measured Fisher of step {entry.step}: missing modalities {missing}")
        out.append(MeasuredFisher(entry.step, entry.values, tuple(slots)))  # type: ignore[arg-type]
    return tuple(out)


def check_report(rep: StepReport) -> None:
    """A report defers all of its modalities or none, and carries a value for its own step only
    as a fallback report (a step the client applied without the answer, measured since)."""
    deferred = [isinstance(f, FisherDeferred) for f in rep.fisher]
    if any(deferred) and not all(deferred):
        raise InvalidArgument("fisher_deferred must be set for every modality of a report or for none")
    for entry in rep.measured:
        if entry.step > rep.step:
            raise InvalidArgument(f"measured Fisher of step {entry.step} arrives with step {rep.step}, before it")
        if entry.step == rep.step and not (rep.deferred and rep.fallback):
            raise InvalidArgument(
                "a report carries measured Fisher values of its own step only as a fallback report "
                "with fisher_deferred; send a value you already know as `fisher`"
            )


def own_entry(rep: StepReport) -> Optional[MeasuredFisher]:
    """The measured values of the report's own step (a late fallback report), if any."""
    last = rep.measured[-1] if rep.measured else None
    return last if last is not None and last.step == rep.step else None


def recorded_fishers(rep: StepReport, computed: tuple[object, ...]) -> tuple[float, ...]:
    """A new record's fishers: deferred ones are PENDING unless the report carries its own."""
    own = own_entry(rep)
    return tuple(
        (own.fishers[i] if own is not None else PENDING) if isinstance(f, FisherDeferred) else f  # type: ignore[misc]
        for i, f in enumerate(computed)
    )


def same_values(record: StepRecord, entry: MeasuredFisher) -> None:
    """A value that was recorded already must be sent again unchanged (a retried request)."""
    if record.fishers != entry.fishers:
        raise AlreadyExists(
            f"step {entry.step} was already recorded with Fisher values {list(record.fishers)}, "
            f"not {list(entry.fishers)}"
        )


def resolve_earlier(
    entries: Sequence[MeasuredFisher],
    pending: Optional[StepRecord],
    recorded: Callable[[int], Optional[StepRecord]],
) -> Optional[StepRecord]:
    """Applies the entries for earlier steps: the pending step's values fill it (returned, as
    its new record); any other entry must repeat what is recorded."""
    filled: Optional[StepRecord] = None
    for entry in entries:
        if pending is not None and entry.step == pending.step:
            filled = pending.with_fishers(entry.fishers)
            continue
        record = recorded(entry.step)
        if record is None:
            raise FailedPrecondition(f"measured Fisher values for step {entry.step}, which is not recorded")
        if record.fisher_pending:  # pending, but not the session's pending step: impossible by construction
            raise FailedPrecondition(f"step {entry.step}'s Fisher values can no longer be filled in")
        same_values(record, entry)
    return filled


def require_none_pending(pending: Optional[StepRecord], filled: Optional[StepRecord], what: str) -> None:
    if pending is not None and filled is None:
        raise FailedPrecondition(
            f"the Fisher values of step {pending.step} are pending: {what} must carry them in `measured`"
        )


def settle(
    current: EpochSummary,
    entries: Sequence[MeasuredFisher],
    waiting: Optional[StepRecord],
    recorded: Callable[[int], Optional[StepRecord]],
    what: str,
) -> tuple[EpochSummary, Optional[StepRecord]]:
    """Before a new step is recorded or an epoch closes (``what``): the measured ``entries`` fill
    the ``waiting`` (pending) step, which must be among them, and its values join the epoch's
    running sums. Returns the epoch with them and the filled record (None if none was waiting)."""
    filled = resolve_earlier(entries, waiting, recorded)
    require_none_pending(waiting, filled, what)
    return (current.add_fisher(filled.fishers) if filled is not None else current), filled


def finite_trace(values: Sequence[float], modalities: Sequence[str], step: int) -> None:
    """Deferred values can still overflow the epoch's running sum."""
    for m, v in zip(modalities, values):
        if not math.isfinite(v):
            raise InvalidArgument(f"the Fisher value of {shown(m)} at step {step} makes the epoch's trace overflow float64")
