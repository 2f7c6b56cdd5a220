"""The session manager: all sessions of one server, thread-safe, persisted at every durable point.

Locks. A per-job lock serializes a job's lifecycle (open, close, expire, and loading its
sessions from the store); each session's lock serializes its steps; the manager lock guards the
dictionaries only. The order is job lock, then session lock(s), then the manager lock, and the
manager lock is never held across store I/O nor while waiting for another lock, so one job's
slow or failing write never holds up another job. Every wait for a job's or a session's lock is
bounded by ``Limits.store_timeout_s`` (UNAVAILABLE beyond it), as is every store call.

Memory stays within ``Limits.memory_budget`` (``memory_budget.py``): open sessions are capped
(``max_open_sessions``), inactive ones (closed, superseded, expired) are kept in a small LRU and
otherwise read back from the store on demand, each session caches only its last answers, and
history pages are cached as encoded bytes (``history.py``); under pressure the caches are
evicted (history first, then inactive sessions, then answers beyond a few per session) before a
new session is refused.

Failure. A write that fails changes nothing (UNAVAILABLE). A write whose outcome is unknown
(a hung disk) blocks its job until the store settles it, then the job's sessions are re-read
from the store. A session whose stored records do not decode is quarantined (DATA_LOSS, listed
as CORRUPT, its rows untouched) and every other session is served.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Union

from ..capacity.history import MAX_PAGE_BYTES, HistoryPages, Page
from ..capacity.memory_budget import MemoryBudget
from ..errors import DataLoss, FailedPrecondition, NotFound, Unavailable
from ..model import (
    EpochSummary,
    Limits,
    MeasuredFisher,
    RawReport,
    SessionConfig,
    SessionKey,
    SessionStatus,
    SessionView,
    StepRecord,
)
from ..storage import StateStore, StoreError
from ..storage.base import Quarantined
from .accounting import SessionMemory
from .directory import SessionDirectory
from .observer import NullObserver, SessionObserver
from .ownership import Ownership
from .opening import OpenPlan, SessionOpener
from .paging import HistorySnapshot, SessionHistory
from .session import EpochOutcome, Session, StepOutcome

log = logging.getLogger(__name__)

PRUNE_ROWS = 5000  # step rows deleted per store transaction when pruning (keeps commits short)

__all__ = ["HistorySnapshot", "SessionManager"]


class SessionManager:
    """The operations on sessions (open, report, end an epoch, close, expire, prune, read),
    each planned, persisted and committed under its session's lock; finding sessions, their
    memory and their history pages are the jobs of ``directory``, ``memory`` and ``history``."""

    def __init__(
        self,
        store: StateStore,
        observer: Optional[SessionObserver] = None,
        limits: Limits = Limits(),
        clock: Callable[[], float] = time.time,
        budget: Optional[MemoryBudget] = None,
        ownership: Optional[Ownership] = None,
    ) -> None:
        """``ownership``: several replicas share the store; each job is served under its lease."""
        self._store = store
        self._observer: SessionObserver = observer or NullObserver()
        self.limits = limits
        self._clock = clock
        self._wait_s = limits.store_timeout_s
        self.budget = budget if budget is not None else MemoryBudget(limits.memory_budget)
        self.history = SessionHistory(HistoryPages(self.budget))  # registers first: history is evicted first
        # closed epochs are spilled to the store and re-read on demand, unless it is this memory
        self.memory = SessionMemory(self.budget, None if store.in_budget else self._read_epochs)
        self.directory = SessionDirectory(
            store, self._observer, self.memory, self.history.pages, self._wait_s, limits.inactive_cache, ownership
        )
        self._opener = SessionOpener(self.directory, self.memory, limits)
        self.budget.add_evictor(lambda wanted: self.memory.evict_inactive(wanted, self.directory.pop_oldest_inactive))
        self.budget.add_evictor(lambda wanted: self.memory.evict_answers(wanted, self.directory.open_by_activity()))

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _read_epochs(self, key: SessionKey, first: int, last: int) -> list[EpochSummary]:
        """Closed epochs ``first``..``last`` of ``key`` from the store (spilled from memory)."""
        return self.directory.load(lambda: self._store.closed_epochs(key, first, last))  # type: ignore[return-value]

    # -- lifecycle --------------------------------------------------------------------------

    def restore(self) -> int:
        """Loads the open sessions from the store; returns how many. Sessions that do not decode
        are quarantined, the others are served. Several replicas: none (a job is loaded by the
        replica that takes its lease)."""
        if self.directory.ownership is not None:
            return 0
        restored = 0
        for item in self._store.load(open_only=True):
            key = item.key if isinstance(item, Quarantined) else item.config.key
            with self.directory.lock:  # a quarantined open session may still be its job's latest attempt
                self.directory.latest[key.job_id] = max(self.directory.latest.get(key.job_id, -1), key.attempt)
            if isinstance(item, Quarantined):
                self.directory.quarantine(key, item.reason, item)
                continue
            try:
                session = Session.restore(item)
            except Exception as exc:  # decodable, but not a state this server can run
                self.directory.quarantine(key, f"{type(exc).__name__}: {exc}")
                continue
            self.memory.spill(session)
            with self.directory.lock:
                self.directory.open[key] = session
            self.memory.charge(session)
            self._observer.session_opened(session.config, session.view().window)
            restored += 1
        if self.directory.corrupt:
            log.error("%d session(s) quarantined (records that do not decode): %s", len(self.directory.corrupt),
                      ", ".join(str(k) for k in self.directory.corrupt))
        return restored

    def close_store(self) -> None:
        if self.directory.ownership is not None:  # first: the leases end now, others take over at once
            self.directory.ownership.close()
        self._store.close()

    def store_health(self, probe: bool = False) -> Optional[str]:
        """Why the store fails right now (None: healthy); ``probe`` tries a write if it does."""
        return self._store.probe() if probe else self._store.health()

    # -- operations -------------------------------------------------------------------------

    def open(
        self, config: SessionConfig, next_attempt: bool = False, snapshot: tuple[EpochSummary, ...] = ()
    ) -> tuple[SessionView, bool]:
        """Creates a session, or returns the identical open one (``created`` False).

        ``next_attempt``: the server assigns the attempt (``SessionOpener._assigned``). ``snapshot``:
        the closed epochs a resuming job's checkpoint carries (``restore.py``), restored only if
        this regulator holds no attempt of the job. Planned, persisted, committed, as a step is."""
        self.directory.claim(config.job_id)
        with self.directory.jobs.hold(config.job_id, self._wait_s):
            plan = self._opener.plan(config, next_attempt, snapshot, self._now_ms())
            if plan.existing is not None:
                return plan.existing, False
            self._persist_and_commit_open(plan)
        assert plan.session is not None
        return plan.session.view(), True

    def _persist_and_commit_open(self, plan: OpenPlan) -> None:
        """Writes the new session (ending the superseded one in the same transaction), then
        makes it its job's latest attempt (job lock held)."""
        session, superseded = plan.session, plan.superseded
        assert session is not None
        config, job = plan.config, plan.config.job_id

        def write() -> None:
            previous_key = superseded.key if superseded is not None else None
            self._store.create_session(config, session.created_ms, plan.window, previous_key, plan.inherited)

        if superseded is None:
            self.directory.persist(job, write)
            self.memory.spill(session)  # not seen by other calls before adopt
            self.directory.adopt(session)
        else:
            with self.directory.locked(superseded):
                self.directory.persist(job, write)
                self.memory.spill(session)
                superseded.deactivate(SessionStatus.SUPERSEDED)
                self.directory.adopt(session, superseded)
            self.memory.charge(superseded)
            self._observer.session_ended(superseded.config, SessionStatus.SUPERSEDED)
        self.memory.charge(session)
        self._observer.session_opened(config, plan.window)

    def report(self, raw: RawReport) -> tuple[SessionConfig, StepOutcome]:
        """Answers one step; returns the session's config with the outcome."""
        session = self.directory.live(raw.key)
        lock = session.lock
        self.directory.acquire(session)  # inline try/finally, not _locked: this is the per-step path
        try:
            # store reads go through _load: a failing store is UNAVAILABLE, never INTERNAL
            outcome = session.plan_report(
                raw,
                lambda key, step: self.directory.load(lambda: self._store.get_step(key, step)),  # type: ignore[arg-type,return-value]
                lambda key, epoch: self.directory.load(lambda: self._store.epoch_steps(key, epoch)),  # type: ignore[arg-type,return-value]
            )
            if not outcome.duplicate:
                if not outcome.amended and not self.memory.spills:
                    self.memory.room_for_step(session)  # the memory store keeps every step
                now = self._now_ms()
                key = session.key
                if outcome.amended:
                    self.directory.persist(key.job_id, lambda: self._store.replace_step(key, outcome.record, now))
                    self.history.amended(key)  # cached history pages are stale
                elif outcome.filled is None:
                    self.directory.persist(key.job_id, lambda: self._store.append_step(key, outcome.record, now))
                else:  # with the earlier step whose deferred Fisher values came with this report
                    self.directory.persist(
                        key.job_id, lambda: self._store.append_step(key, outcome.record, now, filled=outcome.filled)
                    )
                session.commit_report(outcome)
                session.last_active_ms = now
                if self.memory.stale(session):
                    self.memory.charge(session)
            # inside the lock, so that gauges follow the steps' order
            self._observer.step_recorded(session.config, outcome.record, outcome.window, outcome.duplicate)
        finally:
            lock.release()
        if self.budget.over():
            self.budget.make_room()
        return session.config, outcome

    def end_epoch(
        self, key: SessionKey, epoch: int, measured: Optional[MeasuredFisher] = None
    ) -> tuple[SessionConfig, EpochOutcome]:
        """Closes an epoch; ``measured``: the deferred Fisher values of its last step."""
        session = self.directory.live(key)
        with self.directory.locked(session):
            outcome = session.plan_end_epoch(
                epoch, measured, lambda k, step: self.directory.load(lambda: self._store.get_step(k, step))  # type: ignore[arg-type,return-value]
            )
            if not outcome.duplicate:
                self.memory.room_for_epoch(session)
                now = self._now_ms()
                args = (key, outcome.closed, outcome.next_epoch, outcome.next_window, now)
                if outcome.filled is None:
                    self.directory.persist(key.job_id, lambda: self._store.close_epoch(*args))
                else:  # with the last step, whose deferred Fisher values came with the EndEpoch
                    self.directory.persist(key.job_id, lambda: self._store.close_epoch(*args, filled=outcome.filled))
                session.commit_end_epoch(outcome)
                session.last_active_ms = now
                self.memory.spill(session)
                self.memory.charge(session)
                self._observer.epoch_closed(session.config, outcome.closed, outcome.next_window)
        return session.config, outcome

    def close(self, key: SessionKey) -> SessionView:
        return self._end(key, SessionStatus.CLOSED)

    def _end(self, key: SessionKey, status: SessionStatus, idle_before_ms: Optional[int] = None) -> SessionView:
        """Ends an open session (``idle_before_ms``: only if it was idle since then)."""
        with self.directory.jobs.hold(key.job_id, self._wait_s):
            session = self.directory.live(key)
            with self.directory.locked(session):
                ended = session.status == SessionStatus.OPEN and (
                    idle_before_ms is None or session.last_active_ms < idle_before_ms
                )
                if ended:
                    now = self._now_ms()
                    self.directory.persist(key.job_id, lambda: self._store.set_status(key, status, now))
                    session.last_active_ms = now
                    session.deactivate(status)
                    with self.directory.lock:
                        self.directory.retire_locked(session)
                view = session.view()
            if ended:
                self.memory.charge(session)
                self._observer.session_ended(session.config, status)
        return view

    def expire_idle(self) -> list[SessionKey]:
        """Expires (persistently) every open session idle for longer than the TTL."""
        ttl_ms = self.limits.session_ttl_s * 1000
        if ttl_ms <= 0:
            return []
        cutoff = self._now_ms() - ttl_ms
        with self.directory.lock:
            idle = [s.key for s in self.directory.open.values() if s.last_active_ms < cutoff]
        expired = []
        for key in idle:
            try:
                view = self._end(key, SessionStatus.EXPIRED, idle_before_ms=cutoff)
            except (Unavailable, FailedPrecondition, NotFound, DataLoss) as exc:
                log.warning("could not expire %s: %s", key, exc)
                continue
            if view.status == SessionStatus.EXPIRED:
                expired.append(key)
                log.info("session %s expired after %.0fs idle", key, self.limits.session_ttl_s)
        return expired

    def prune_steps(self) -> list[SessionKey]:
        """Deletes the step records of sessions that ended more than ``step_retention_s`` ago
        (their epochs and windows stay); returns the sessions pruned completely."""
        retention_ms = int(self.limits.step_retention_s * 1000)
        if retention_ms <= 0:
            return []
        now = self._now_ms()
        with self.directory.lock:
            skip = frozenset(self.directory.corrupt)
        pruned: list[SessionKey] = []
        while True:
            try:
                done = self._store.prune_steps(now - retention_ms, now, PRUNE_ROWS, skip)
            except StoreError as exc:
                log.warning("pruning step records failed: %s", exc)
                break
            for key in done:
                self.history.pages.forget(key)
                with self.directory.lock:
                    session = self.directory.inactive.get(key)
                if session is not None:
                    session.steps_pruned_ms = now
                log.info("pruned the step records of %s (ended more than %.0fs ago)", key, self.limits.step_retention_s)
            pruned += done
            if not done:
                break
        return pruned

    # -- reads ------------------------------------------------------------------------------

    def open_sessions(self) -> list[Session]:
        """The open sessions (their state is read without their locks: the metrics' scrape)."""
        with self.directory.lock:
            return list(self.directory.open.values())

    def snapshot(self, job_id: str, attempt: Optional[int] = None) -> HistorySnapshot:
        session = self.directory.find(job_id, attempt)
        with self.directory.locked(session):
            return self.history.snapshot(session)

    def history_page(
        self, snap: HistorySnapshot, start: int, max_steps: int, encode: Callable[[StepRecord], bytes],
        max_bytes: int = MAX_PAGE_BYTES,
    ) -> Page:
        """Recorded steps from ``start`` as encoded ``steps`` fields (no session lock is held:
        the records come from the store and the page cache)."""
        key = snap.key

        def load(first: int, last: int, limit: int) -> list[StepRecord]:
            return self.directory.load(lambda: self._store.step_range(key, first, last, limit))  # type: ignore[return-value]

        return self.history.page(snap, start, max_steps, load, encode, max_bytes)

    def closed_epochs(
        self, snap: HistorySnapshot, closed: list[EpochSummary], encode: Callable[[EpochSummary], bytes]
    ) -> bytes:
        """The ``epochs`` fields of a snapshot's closed epochs (cached: they never change); those
        the session spilled are read from the store."""
        key = snap.key
        return self.history.closed_epochs(snap, closed, encode, lambda first, last: self._read_epochs(key, first, last))

    def list(self, include_inactive: bool = False, limit: int = 0) -> list[Union[SessionView, Quarantined]]:
        """Open sessions and quarantined ones; with ``include_inactive`` also the newest ended ones."""
        with self.directory.lock:
            sessions = list(self.directory.open.values())
        if include_inactive:
            cap = min(limit or self.limits.max_listed_inactive, self.limits.max_listed_inactive)
            keys = self.directory.load(lambda: self._store.inactive_keys(cap))
            for k in keys:  # type: ignore[union-attr]
                try:
                    s = self.directory.get(k)
                except DataLoss:
                    continue  # listed below, as quarantined
                if s is not None:
                    sessions.append(s)
        out: list[Union[SessionView, Quarantined]] = []
        for s in sessions:
            with self.directory.locked(s):
                out.append(s.view())
        with self.directory.lock:
            out += list(self.directory.corrupt.values())
        keyed = {_key_of(v): v for v in out}
        return sorted(keyed.values(), key=lambda v: (_key_of(v).job_id, _key_of(v).attempt))


def _key_of(v: Union[SessionView, Quarantined]) -> SessionKey:
    return v.config.key if isinstance(v, SessionView) else v.key
