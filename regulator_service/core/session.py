"""The state of one session (one attempt of one job) and its transitions.

Every transition is split into ``plan_*`` (validate and compute the new values, touching
nothing) and ``commit_*`` (assign them). The manager persists between the two while it holds
``lock``, so a request that is rejected, or whose write fails, leaves the session exactly as it
was.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from . import pending, reports
from .closed_epochs import ClosedEpochs, EpochSource
from ..errors import AlreadyExists, FailedPrecondition
from ..model import (
    EpochSummary,
    Fallback,
    FisherTerms,
    MeasuredFisher,
    RawReport,
    SessionConfig,
    SessionKey,
    SessionStatus,
    SessionView,
    StepRecord,
    StepReport,
    regulated_fisher,
)
from ..policy import Policy, StepFactors, Window, build_policy
from ..storage import StoredSession

RECENT_STEPS = 1024  # answers kept in memory for duplicate reports; older ones come from the store


@dataclass(frozen=True)
class StepOutcome:
    record: StepRecord
    window: tuple[Window, ...]
    duplicate: bool
    next_summary: Optional[EpochSummary] = None  # set when the step is new or amended
    amended: bool = False  # a late fallback report replaced the regulated record of the step
    filled: Optional[StepRecord] = None  # the earlier pending step, with its deferred Fisher values


@dataclass(frozen=True)
class EpochOutcome:
    closed: EpochSummary
    next_epoch: int
    next_window: tuple[Window, ...]
    duplicate: bool
    filled: Optional[StepRecord] = None  # the epoch's last step, with its deferred Fisher values


class Session:
    """Mutable state of one (job, attempt). Call every method with ``lock`` held."""

    def __init__(
        self,
        config: SessionConfig,
        status: SessionStatus,
        created_ms: int,
        last_active_ms: int,
        closed_epochs: tuple[EpochSummary, ...],
        current: EpochSummary,
        step_count: int,
        last_step: int,
        recent: tuple[StepRecord, ...] = (),
    ) -> None:
        self.lock = threading.Lock()
        self.config = config
        self.policy: Policy = build_policy(config.profile, config.modalities)
        self.status = status
        self.created_ms = created_ms
        self.last_active_ms = last_active_ms
        self._closed = ClosedEpochs(closed_epochs, len(config.modalities))
        self._current = current
        self._step_count = step_count
        self._last_step = last_step
        self._recent: OrderedDict[int, StepRecord] = OrderedDict((r.step, r) for r in recent)
        self._index = {name: i for i, name in enumerate(config.modalities)}
        self.steps_pruned_ms = 0  # > 0: the store pruned its step records then (retention)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def new(cls, config: SessionConfig, created_ms: int, inherited: tuple[EpochSummary, ...] = ()) -> "Session":
        """A fresh session, or a resumed one that continues after the ``inherited`` epochs."""
        policy = build_policy(config.profile, config.modalities)
        traces = tuple(tuple(e.fisher[m] for e in inherited) for m in range(len(config.modalities)))
        window = policy.window(traces, len(inherited))
        return cls(
            config,
            SessionStatus.OPEN,
            created_ms,
            created_ms,
            inherited,
            EpochSummary.start(len(inherited), window),
            step_count=0,
            last_step=-1,
        )

    @classmethod
    def restore(cls, stored: StoredSession) -> "Session":
        current = EpochSummary.start(stored.open_epoch, stored.open_window)
        for record in stored.open_steps:
            current = current.add(record)
        session = cls(
            stored.config,
            stored.status,
            stored.created_ms,
            stored.last_active_ms,
            stored.closed_epochs,
            current,
            stored.step_count,
            stored.last_step,
            stored.open_steps[-RECENT_STEPS:],
        )
        session.steps_pruned_ms = stored.steps_pruned_ms
        return session

    # -- reads ------------------------------------------------------------------------------

    @property
    def key(self) -> SessionKey:
        return self.config.key

    def view(self) -> SessionView:
        return SessionView(
            config=self.config,
            status=self.status,
            epoch=self._current.epoch,
            window=self._current.windows,
            last_step=self._last_step,
            steps=self._step_count,
            created_ms=self.created_ms,
            last_active_ms=self.last_active_ms,
        )

    def epochs(self) -> tuple[EpochSummary, ...]:
        """Closed epochs, then the open one (spilled ones are read back from the store)."""
        return (*self._closed.all(), self._current)

    def kept_epochs(self) -> tuple[int, tuple[EpochSummary, ...]]:
        """(how many closed epochs were spilled, the closed epochs in memory then the open one)."""
        spilled, kept = self._closed.kept()
        return spilled, (*kept, self._current)

    def closed_epoch(self, epoch: int) -> EpochSummary:
        """Closed epoch ``epoch``, from memory or, spilled, from the store."""
        return self._closed.get(epoch)

    def gauges(self) -> tuple[int, tuple[Window, ...], Optional[EpochSummary], Optional[StepRecord]]:
        """(open epoch, its windows, the last closed epoch, the last step's record) for the
        metrics, read at scrape time without the lock: each is one attribute read, and a scrape
        that races a step sees the step before or after it."""
        current = self._current
        return current.epoch, current.windows, self._closed.last(), self._recent.get(self._last_step)

    # -- memory (accounted by the manager against the server's budget) -----------------------

    @property
    def cached_answers(self) -> int:
        return len(self._recent)

    @property
    def closed_epoch_count(self) -> int:
        return self._closed.count

    @property
    def recorded_steps(self) -> int:
        return self._step_count

    @property
    def kept_epoch_count(self) -> int:
        """Closed epochs held in memory (the others are spilled)."""
        return self._closed.kept_count

    def trace_bytes(self) -> int:
        """What the Fisher traces the policy reads take (they grow with the closed epochs)."""
        return self._closed.trace_bytes()

    def spill(self, keep: int, source: EpochSource) -> int:
        """Drops all but the ``keep`` newest closed epochs from memory (the store has them all;
        ``source`` reads them back for GetSession and late ranks); returns how many went."""
        return self._closed.spill(keep, source)

    def trim_answers(self, keep: int) -> int:
        """Drops all but the ``keep`` newest cached answers (the store has every answer, so a
        duplicate of a dropped one is answered from it); returns how many were dropped. The
        newest is always kept: it may be the step whose deferred Fisher values are pending."""
        dropped = 0
        while len(self._recent) > max(keep, 1):
            self._recent.popitem(last=False)
            dropped += 1
        return dropped

    def require_open(self) -> None:
        if self.status == SessionStatus.SUPERSEDED:
            raise FailedPrecondition(f"session {self.key} was superseded by a newer attempt")
        if self.status == SessionStatus.EXPIRED:
            raise FailedPrecondition(
                f"session {self.key} expired after being idle; open a new attempt to continue"
            )
        if self.status != SessionStatus.OPEN:
            raise FailedPrecondition(f"session {self.key} is closed")

    def deactivate(self, status: SessionStatus) -> None:
        """Closed, superseded or expired: drop the in-memory answer cache (the store keeps it)."""
        self.status = status
        self._recent.clear()

    # -- Report -----------------------------------------------------------------------------

    def _pending_step(self) -> Optional[StepRecord]:
        """The last step, while its deferred Fisher values have not arrived (see ``pending``)."""
        record = self._recent.get(self._last_step)
        return record if record is not None and record.fisher_pending else None

    def _stored_answer(
        self, step: int, lookup: Callable[[SessionKey, int], Optional[StepRecord]]
    ) -> Optional[StepRecord]:
        record = self._recent.get(step)
        if record is None and step <= self._last_step:
            record = lookup(self.key, step)
        return record

    def _window_of(self, epoch: int) -> tuple[Window, ...]:
        if epoch == self._current.epoch:
            return self._current.windows
        return self.closed_epoch(epoch).windows

    def plan_report(
        self,
        raw: RawReport,
        lookup: Callable[[SessionKey, int], Optional[StepRecord]],
        epoch_steps: Callable[[SessionKey, int], Iterable[StepRecord]],
    ) -> StepOutcome:
        rep = reports.normalize(self.config, self._index, raw)
        pending.check_report(rep)
        prior = self._stored_answer(rep.step, lookup)
        if prior is not None:  # answered before: also after CloseSession, for late ranks
            return self._repeat(rep, prior, lookup, epoch_steps)
        self.require_open()
        if rep.step <= self._last_step:
            raise FailedPrecondition(
                f"step {rep.step} goes backwards: {self.key} is at step {self._last_step}"
            )
        current = self._current
        if rep.epoch != current.epoch:
            raise FailedPrecondition(
                f"step {rep.step} is for epoch {rep.epoch} but {self.key} has epoch "
                f"{current.epoch} open (close epochs with EndEpoch, in order)"
            )
        # the pending step's deferred Fisher values first: the trace is summed in step order
        earlier = [m for m in rep.measured if m.step < rep.step]
        recorded = lambda s: self._stored_answer(s, lookup)  # noqa: E731
        current, filled = pending.settle(current, earlier, self._pending_step(), recorded, f"the report of step {rep.step}")
        record = self._record(rep, current.windows)
        summary = current.add(record)
        reports.require_finite(self.config.modalities, rep, record, summary)
        return StepOutcome(record, current.windows, duplicate=False, next_summary=summary, filled=filled)

    def _record(self, rep: StepReport, windows: tuple[Window, ...]) -> StepRecord:
        if rep.applied is not None:
            # what the client applied on its own
            factors = StepFactors(rep.applied, rep.applied_grad_scale, rep.applied_noise_scale)
        else:
            factors = self.policy.factors(windows, rep.epoch, rep.count, rep.score_sums)
        proximal = factors.proximal
        fishers = tuple(
            regulated_fisher(f.grad_sq, f.grad_delta, f.delta_sq, a)
            if isinstance(f, FisherTerms)
            else f
            for f, a in zip(rep.fisher, proximal)
        )
        fishers = pending.recorded_fishers(rep, fishers)
        return StepRecord(
            epoch=rep.epoch,
            step=rep.step,
            count=rep.count,
            score_sums=rep.score_sums,
            fishers=fishers,
            proximal=proximal,
            fallback=rep.fallback,
            digest=rep.digest,
            grad_scale=factors.grad_scale,
            noise_scale=factors.noise_scale,
        )

    def _repeat(
        self,
        rep: StepReport,
        prior: StepRecord,
        lookup: Callable[[SessionKey, int], Optional[StepRecord]],
        epoch_steps: Callable[[SessionKey, int], Iterable[StepRecord]],
    ) -> StepOutcome:
        """A report for a recorded step: the stored answer, a conflict, or an amendment."""
        if prior.digest != rep.digest:
            raise AlreadyExists(
                f"step {rep.step} of {self.key} was already reported with different statistics"
            )
        # values of earlier steps were recorded with the first report of this one: must be equal
        earlier = [m for m in rep.measured if m.step < rep.step]
        pending.resolve_earlier(earlier, None, lambda s: self._stored_answer(s, lookup))
        own = pending.own_entry(rep)
        window = self._window_of(prior.epoch)
        if rep.fallback == Fallback.NONE or (rep.fallback == prior.fallback and reports.same_applied(rep, prior)):
            if own is None or not prior.fisher_pending:
                if own is not None:
                    pending.same_values(prior, own)
                # the stored answer wins: a late rank applies what the others applied
                return StepOutcome(prior, window, duplicate=True)
            # a repeated late report brings the values its first delivery lacked: fill them in
        elif prior.fallback != Fallback.NONE:
            raise AlreadyExists(
                f"step {rep.step} of {self.key} was already reported as applied with other factors"
            )
        # The regulator answered, but the client never got the answer and ran the step without
        # it: the history must say what was applied, so the record is amended.
        self.require_open()
        if prior.epoch != self._current.epoch:
            raise FailedPrecondition(
                f"step {rep.step} of {self.key} belongs to closed epoch {prior.epoch}; a fallback "
                "report must arrive before its epoch ends"
            )
        record = self._record(rep, window)
        summary = EpochSummary.start(self._current.epoch, self._current.windows)
        for r in epoch_steps(self.key, prior.epoch):
            summary = summary.add(record if r.step == record.step else r)
        reports.require_finite(self.config.modalities, rep, record, summary)
        return StepOutcome(record, window, duplicate=False, next_summary=summary, amended=True)

    def commit_report(self, outcome: StepOutcome) -> None:
        assert outcome.next_summary is not None
        record = outcome.record
        self._current = outcome.next_summary
        if not outcome.amended:
            self._last_step = record.step
            self._step_count += 1
        if outcome.filled is not None and outcome.filled.step in self._recent:
            self._recent[outcome.filled.step] = outcome.filled
        self._recent[record.step] = record
        if len(self._recent) > RECENT_STEPS:
            self._recent.popitem(last=False)

    # -- EndEpoch ---------------------------------------------------------------------------

    def plan_end_epoch(
        self,
        epoch: int,
        measured: Optional[MeasuredFisher] = None,
        lookup: Callable[[SessionKey, int], Optional[StepRecord]] = lambda key, step: None,
    ) -> EpochOutcome:
        """``measured``: the deferred Fisher values of the epoch's last step, if it is pending."""
        current = self._current
        entries = pending.in_order((measured,), self._index, self.config.modalities) if measured else ()
        recorded = lambda s: self._stored_answer(s, lookup)  # noqa: E731
        if epoch < current.epoch:  # closed before: also after CloseSession, for late ranks
            pending.resolve_earlier(entries, None, recorded)
            return EpochOutcome(self.closed_epoch(epoch), epoch + 1, self._window_of(epoch + 1), True)
        self.require_open()
        if epoch > current.epoch:
            raise FailedPrecondition(
                f"cannot close epoch {epoch}: {self.key} has epoch {current.epoch} open"
            )
        current, filled = pending.settle(current, entries, self._pending_step(), recorded, f"EndEpoch({epoch})")
        if filled is not None:
            pending.finite_trace(current.fisher, self.config.modalities, filled.step)
        closed = current.close()
        traces = self._closed.traces_with(closed.fisher)
        next_window = self.policy.window(traces, epoch + 1)
        return EpochOutcome(closed, epoch + 1, next_window, duplicate=False, filled=filled)

    def commit_end_epoch(self, outcome: EpochOutcome) -> None:
        if outcome.filled is not None and outcome.filled.step in self._recent:
            self._recent[outcome.filled.step] = outcome.filled
        self._closed.append(outcome.closed)
        self._current = EpochSummary.start(outcome.next_epoch, outcome.next_window)
