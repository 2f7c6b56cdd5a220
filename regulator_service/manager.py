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

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Union

from .errors import AlreadyExists, DataLoss, FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from .history import MAX_PAGE_BYTES, HistoryPages, Page
from .memory_budget import ANSWER_FLOOR, MIB, MemoryBudget, answer_bytes, epoch_bytes, session_bytes
from .model import (
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
from .observer import NullObserver, SessionObserver
from . import restore
from .session import EpochOutcome, Session, StepOutcome
from .storage import StateStore, StoreError
from .storage.base import CorruptRecord, Quarantined, StoreInDoubt

log = logging.getLogger(__name__)

PRUNE_ROWS = 5000  # step rows deleted per store transaction when pruning (keeps commits short)


@dataclass(frozen=True)
class HistorySnapshot:
    """A session's header and epochs at one instant, for a GetSession answer."""

    key: SessionKey
    view: SessionView
    epochs: tuple[EpochSummary, ...]  # closed epochs, then the open one
    version: int  # bumped when a recorded step is amended (cached pages are then stale)
    steps_pruned_ms: int


def quarantine_message(q: Quarantined) -> str:
    return (
        f"session {q.key} is quarantined: its stored records cannot be decoded ({q.reason}); its rows "
        "are left untouched for inspection. Open a new attempt of the job to continue."
    )


class KeyedLocks:
    """One re-entrant lock per key (a job id), created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, list] = {}  # key -> [RLock, users]

    @contextlib.contextmanager
    def hold(self, key: str, timeout: float) -> Iterator[None]:
        with self._lock:
            entry = self._locks.get(key)
            if entry is None:
                entry = self._locks[key] = [threading.RLock(), 0]
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=timeout):
                raise Unavailable(
                    f"job {key!r} is busy: another call on it has not finished within {timeout:g}s "
                    "(is the state store slow?); retry"
                )
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]


class SessionManager:
    def __init__(
        self,
        store: StateStore,
        observer: Optional[SessionObserver] = None,
        limits: Limits = Limits(),
        clock: Callable[[], float] = time.time,
        budget: Optional[MemoryBudget] = None,
    ) -> None:
        self._store = store
        self._observer: SessionObserver = observer or NullObserver()
        self.limits = limits
        self._clock = clock
        self._wait_s = limits.store_timeout_s
        self._lock = threading.Lock()
        self._jobs = KeyedLocks()
        self._open: dict[SessionKey, Session] = {}
        self._inactive: OrderedDict[SessionKey, Session] = OrderedDict()
        self._latest: dict[str, int] = {}  # job id -> attempt of its open (or quarantined) latest session
        self._corrupt: dict[SessionKey, Quarantined] = {}
        self._in_doubt: set[str] = set()  # jobs with a write of unknown outcome
        self._versions: dict[SessionKey, int] = {}  # history version of sessions with amended steps
        self.budget = budget if budget is not None else MemoryBudget(limits.memory_budget)
        self.pages = HistoryPages(self.budget)  # registers itself first: history is evicted first
        self.budget.add_evictor(self._evict_inactive)
        self.budget.add_evictor(self._evict_answers)
        self._charged: dict[SessionKey, list[int]] = {}  # key -> [session bytes, answers counted]
        self._acct_lock = threading.Lock()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- lifecycle --------------------------------------------------------------------------

    def restore(self) -> int:
        """Loads the open sessions from the store; returns how many. Sessions that do not decode
        are quarantined, the others are served."""
        restored = 0
        for item in self._store.load(open_only=True):
            key = item.key if isinstance(item, Quarantined) else item.config.key
            with self._lock:  # a quarantined open session may still be its job's latest attempt
                self._latest[key.job_id] = max(self._latest.get(key.job_id, -1), key.attempt)
            if isinstance(item, Quarantined):
                self._quarantine(key, item.reason, item)
                continue
            try:
                session = Session.restore(item)
            except Exception as exc:  # decodable, but not a state this server can run
                self._quarantine(key, f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                self._open[key] = session
            self._account(session)
            self._observer.session_opened(session.config, session.view().window)
            restored += 1
        if self._corrupt:
            log.error("%d session(s) quarantined (records that do not decode): %s", len(self._corrupt),
                      ", ".join(str(k) for k in self._corrupt))
        return restored

    def close_store(self) -> None:
        self._store.close()

    def store_health(self, probe: bool = False) -> Optional[str]:
        """Why the store fails right now (None: healthy); ``probe`` tries a write if it does."""
        return self._store.probe() if probe else self._store.health()

    # -- store calls ------------------------------------------------------------------------

    def _persist(self, job: str, write: Callable[[], None]) -> None:
        try:
            write()
        except StoreInDoubt as exc:
            with self._lock:
                self._in_doubt.add(job)
            exc.on_resolved(lambda: self._resolved(job))
            raise Unavailable(f"state store write timed out: {exc}") from exc
        except StoreError as exc:
            log.error("state store write failed: %s", exc)
            raise Unavailable(f"state store write failed, nothing was changed: {exc}") from exc

    def _load(self, read: Callable[[], object]) -> object:
        try:
            return read()
        except CorruptRecord as exc:
            q = self._quarantine(exc.key, exc.reason)
            raise DataLoss(quarantine_message(q)) from exc
        except StoreError as exc:
            log.error("state store read failed: %s", exc)
            raise Unavailable(f"state store read failed: {exc}") from exc

    def _resolved(self, job: str) -> None:
        """A write of ``job`` whose outcome was unknown is settled: forget what memory holds of
        the job, so that its sessions are read back as the store has them."""
        with self._lock:
            self._in_doubt.discard(job)
            self._latest.pop(job, None)
            dropped = [s for s in (*self._open.values(), *self._inactive.values()) if s.key.job_id == job]
            for s in dropped:
                self._open.pop(s.key, None)
                self._inactive.pop(s.key, None)
        for s in dropped:
            self._uncharge(s)
            self.pages.forget(s.key)
        log.warning("the pending write of job %r is settled; its sessions are re-read from the store", job)

    # -- memory -----------------------------------------------------------------------------

    def _account(self, session: Session) -> None:
        """Brings the budget up to date with what ``session`` holds."""
        m = len(session.config.modalities)
        fixed = session_bytes(m) + session.closed_epoch_count * epoch_bytes(m)
        n = session.cached_answers
        with self._acct_lock:
            entry = self._charged.setdefault(session.key, [0, 0])
            d_fixed, d_answers = fixed - entry[0], (n - entry[1]) * answer_bytes(m)
            entry[0], entry[1] = fixed, n
        if d_fixed:
            self.budget.add("sessions", d_fixed)
        if d_answers:
            self.budget.add("answers", d_answers)

    def _uncharge(self, session: Session) -> int:
        with self._acct_lock:
            entry = self._charged.pop(session.key, None)
        if entry is None:
            return 0
        answers = entry[1] * answer_bytes(len(session.config.modalities))
        self.budget.add("sessions", -entry[0])
        self.budget.add("answers", -answers)
        return entry[0] + answers

    def _evict_inactive(self, wanted: int) -> int:
        """Drops least recently used inactive sessions (they are re-read on demand)."""
        freed = 0
        while freed < wanted:
            with self._lock:
                if not self._inactive:
                    break
                _, session = self._inactive.popitem(last=False)
            freed += self._uncharge(session)
        return freed

    def _evict_answers(self, wanted: int) -> int:
        """Shrinks the answer caches of the least recently active open sessions to a few each
        (a duplicate of a dropped answer is read from the store). Busy sessions are skipped."""
        with self._lock:
            sessions = sorted(self._open.values(), key=lambda s: s.last_active_ms)
        before = self.budget.used("answers")
        for session in sessions:
            if before - self.budget.used("answers") >= wanted:
                break
            if session.lock.acquire(blocking=False):
                try:
                    if session.trim_answers(ANSWER_FLOOR):
                        self._account(session)
                finally:
                    session.lock.release()
        return before - self.budget.used("answers")

    def _budget_message(self) -> str:
        b = self.budget
        with self._lock:
            n = len(self._open)
        return (
            f"the memory budget is full: {b.used() / MIB:.0f} MiB of {b.limit / MIB:.0f} MiB in use by {n} open "
            f"session(s) whose caches are already evicted; close sessions or raise --memory-budget"
        )

    # -- lookups ----------------------------------------------------------------------------

    def _acquire(self, session: Session) -> None:
        """The session's lock, within the store timeout; then no write of its job may be in doubt
        (one may have gone in doubt while we waited). The caller releases it."""
        if not session.lock.acquire(timeout=self._wait_s):
            raise Unavailable(
                f"session {session.key} is busy: a call on it has not finished within {self._wait_s:g}s "
                "(is the state store slow?); retry"
            )
        if self._in_doubt:
            try:
                self._check_doubt(session.key.job_id)
            except BaseException:
                session.lock.release()
                raise

    @contextlib.contextmanager
    def _locked(self, session: Session) -> Iterator[None]:
        self._acquire(session)
        try:
            yield
        finally:
            session.lock.release()

    def _check_doubt(self, job: str) -> None:
        if job in self._in_doubt:
            raise Unavailable(
                f"a write of job {job!r} has not completed (is the state disk hung?); its sessions are "
                "unavailable until the store settles it; retry"
            )

    def _quarantine(self, key: SessionKey, reason: str, q: Optional[Quarantined] = None) -> Quarantined:
        """Takes a session out of service: its records do not decode. Its rows are never
        written again; the rest of the server carries on."""
        q = q if q is not None else Quarantined(key, reason)
        with self._lock:
            first = key not in self._corrupt
            self._corrupt[key] = q
            session = self._open.pop(key, None) or self._inactive.pop(key, None)
        if first:
            log.error("quarantined session %s: its stored records cannot be decoded: %s", key, reason)
        if session is not None:
            self._uncharge(session)
            self.pages.forget(key)
            if session.status == SessionStatus.OPEN:
                self._observer.session_ended(session.config, SessionStatus.CORRUPT)
        return q

    def _latest_attempt(self, job_id: str) -> Optional[int]:
        """The job's latest attempt (call with the job's lock held)."""
        with self._lock:
            attempt = self._latest.get(job_id)
        if attempt is None:
            attempt = self._load(lambda: self._store.latest_attempt(job_id))  # type: ignore[assignment]
        return attempt

    def _get(self, key: SessionKey) -> Optional[Session]:
        """The session in memory, else read from the store (DATA_LOSS if quarantined)."""
        with self._lock:
            session = self._open.get(key)
            if session is None:
                session = self._inactive.get(key)
                if session is not None:
                    self._inactive.move_to_end(key)
            q = self._corrupt.get(key)
        if q is not None:
            raise DataLoss(quarantine_message(q))
        if session is not None:
            return session
        with self._jobs.hold(key.job_id, self._wait_s):
            with self._lock:
                session = self._open.get(key) or self._inactive.get(key)
            if session is not None:
                return session
            stored = self._load(lambda: self._store.load_session(key))
            if stored is None:
                return None
            try:
                session = Session.restore(stored)  # type: ignore[arg-type]
            except Exception as exc:
                q = self._quarantine(key, f"{type(exc).__name__}: {exc}")
                raise DataLoss(quarantine_message(q)) from exc
            with self._lock:
                if session.status == SessionStatus.OPEN:  # re-read after a write of unknown outcome
                    self._open[key] = session
                    self._latest[key.job_id] = max(self._latest.get(key.job_id, -1), key.attempt)
                else:
                    session.deactivate(session.status)
                    self._remember_inactive_locked(session)
        self._account(session)
        return session

    def _remember_inactive_locked(self, session: Session) -> None:
        self._inactive[session.key] = session
        self._inactive.move_to_end(session.key)
        while len(self._inactive) > self.limits.inactive_cache:
            _, old = self._inactive.popitem(last=False)
            self._uncharge(old)

    def _retire_locked(self, session: Session) -> None:
        """An open session that ended: to the inactive cache (manager lock held)."""
        self._open.pop(session.key, None)
        if self._latest.get(session.key.job_id) == session.key.attempt:
            del self._latest[session.key.job_id]
        self._remember_inactive_locked(session)

    def _live(self, key: SessionKey) -> Session:
        """The session a write addresses, with attempt fencing."""
        job = key.job_id
        with self._lock:
            doubtful = job in self._in_doubt
            latest = self._latest.get(job)
            session = self._open.get(key)
        if doubtful:
            self._check_doubt(job)
        if session is not None and latest == key.attempt:
            return session  # the common case: the job's open session
        with self._jobs.hold(job, self._wait_s):
            latest = self._latest_attempt(job)
            if latest is None:
                raise NotFound(f"no session for job {job!r}; call OpenSession first")
            if key.attempt < latest:
                raise FailedPrecondition(
                    f"attempt {key.attempt} of job {job!r} is stale: attempt {latest} superseded it"
                )
            session = self._get(key)
        if session is None:
            raise NotFound(f"attempt {key.attempt} of job {job!r} was never opened")
        return session

    def _find(self, job_id: str, attempt: Optional[int]) -> Session:
        self._check_doubt(job_id)
        if attempt is None:
            with self._jobs.hold(job_id, self._wait_s):
                attempt = self._latest_attempt(job_id)
        session = None if attempt is None else self._get(SessionKey(job_id, attempt))
        if session is None:
            which = f"job {job_id!r}" if attempt is None else f"attempt {attempt} of job {job_id!r}"
            raise NotFound(f"no session for {which}")
        return session

    # -- operations -------------------------------------------------------------------------

    def open(
        self, config: SessionConfig, next_attempt: bool = False, snapshot: tuple[EpochSummary, ...] = ()
    ) -> tuple[SessionView, bool]:
        """Creates a session, or returns the identical open one (``created`` False).

        ``next_attempt``: the server assigns the attempt (see ``_assigned``). ``snapshot``: the
        closed epochs a resuming job's checkpoint carries (``restore.py``), restored only if this
        regulator holds no attempt of the job."""
        job = config.job_id
        with self._jobs.hold(job, self._wait_s):
            self._check_doubt(job)
            latest = self._latest_attempt(job)
            if next_attempt:
                config = self._assigned(config, latest)
            previous: Optional[Session] = None
            quarantined: Optional[Quarantined] = None
            if latest is not None:
                if config.attempt < latest:
                    raise FailedPrecondition(
                        f"attempt {config.attempt} of job {job!r} is stale: attempt {latest} is the latest"
                    )
                latest_key = SessionKey(job, latest)
                try:
                    previous = self._get(latest_key)
                except DataLoss:  # quarantined: a higher attempt starts afresh beside it
                    quarantined = self._corrupt.get(latest_key)
                    if quarantined is None or config.attempt == latest:
                        raise
                if previous is not None and config.attempt == latest:
                    with self._locked(previous):
                        if previous.config != config:
                            raise AlreadyExists(
                                f"job {job!r} attempt {config.attempt} exists with a different "
                                "configuration; use a new job id or a higher attempt"
                            )
                        previous.require_open()
                        if snapshot:
                            restore.check_agrees(job, snapshot, previous.epochs())
                        return previous.view(), False
            with self._lock:
                n_open = len(self._open)
            if n_open >= self.limits.max_open_sessions:
                raise ResourceExhausted(f"{n_open} sessions are open, the limit is {self.limits.max_open_sessions}")
            if quarantined is not None and config.resume_epoch:
                raise DataLoss(f"cannot resume job {job!r}: {quarantine_message(quarantined)}")
            inherited = self._inherited(config, previous, snapshot, held=latest is not None)
            m = len(config.modalities)
            # room for the session and the few answers it always keeps
            if not self.budget.make_room(session_bytes(m) + len(inherited) * epoch_bytes(m) + ANSWER_FLOOR * answer_bytes(m)):
                raise ResourceExhausted(self._budget_message())
            session = Session.new(config, self._now_ms(), inherited)
            window = session.view().window
            superseded = previous if previous is not None and previous.status == SessionStatus.OPEN else None
            if superseded is not None:
                with self._locked(superseded):
                    self._persist(
                        job,
                        lambda: self._store.create_session(config, session.created_ms, window, superseded.key, inherited),
                    )
                    superseded.deactivate(SessionStatus.SUPERSEDED)
                    with self._lock:
                        self._retire_locked(superseded)
                        self._open[config.key] = session
                        self._latest[job] = config.attempt
                self._account(superseded)
                self._observer.session_ended(superseded.config, SessionStatus.SUPERSEDED)
            else:
                self._persist(job, lambda: self._store.create_session(config, session.created_ms, window, None, inherited))
                with self._lock:
                    self._open[config.key] = session
                    self._latest[job] = config.attempt
            self._account(session)
            self._observer.session_opened(config, window)
        return session.view(), True

    def _assigned(self, config: SessionConfig, latest: Optional[int]) -> SessionConfig:
        """The attempt after the job's latest (0 for a new job), for a retried process that cannot
        know its number; the latest itself if it was opened with this ``open_token``, so that a
        retried request gets the attempt its first try created (job lock held)."""
        if latest is None:
            return replace(config, attempt=0)
        if config.open_token and SessionKey(config.job_id, latest) not in self._corrupt:
            previous = self._get(SessionKey(config.job_id, latest))
            if previous is not None and previous.config.open_token == config.open_token:
                return replace(config, attempt=latest)
        return replace(config, attempt=latest + 1)

    def _inherited(
        self, config: SessionConfig, previous: Optional[Session], snapshot: tuple[EpochSummary, ...] = (),
        held: bool = True,
    ) -> tuple[EpochSummary, ...]:
        """The closed epochs an elastic restart resumes after (job lock held): the previous
        attempt's, which the ``snapshot`` must agree with, else - for a job this regulator does
        not hold at all (not ``held``) - the snapshot's."""
        n = config.resume_epoch
        if n == 0:
            return ()
        if previous is None:
            if snapshot and not held:
                restore.check_windows(config, snapshot)  # INVALID_ARGUMENT: another profile's, or altered
                log.info("job %r: no attempt here; restoring its %d closed epoch(s) from its checkpoint", config.job_id, n)
                return snapshot
            hint = "" if snapshot else (
                ", and the request carries no snapshot of its epochs (InfoRegHook.state_dict puts one in a checkpoint)"
            )
            raise FailedPrecondition(f"cannot resume job {config.job_id!r} at epoch {n}: it has no previous attempt{hint}")
        with self._locked(previous):
            prev = previous.config
            if (prev.modalities, prev.profile) != (config.modalities, config.profile):
                raise FailedPrecondition(
                    f"cannot resume job {config.job_id!r}: attempt {prev.attempt} ran other modalities "
                    "or another profile"
                )
            closed = [e for e in previous.epochs() if e.closed]
        if len(closed) < n:
            raise FailedPrecondition(
                f"cannot resume job {config.job_id!r} at epoch {n}: attempt {prev.attempt} closed only "
                f"{len(closed)} epoch(s)"
            )
        if snapshot:
            restore.check_agrees(config.job_id, snapshot, closed[:n])
        return tuple(closed[:n])

    def report(self, raw: RawReport) -> tuple[SessionConfig, StepOutcome]:
        """Answers one step; returns the session's config with the outcome."""
        session = self._live(raw.key)
        lock = session.lock
        self._acquire(session)  # inline try/finally, not _locked: this is the per-step path
        try:
            # store reads go through _load: a failing store is UNAVAILABLE, never INTERNAL
            outcome = session.plan_report(
                raw,
                lambda key, step: self._load(lambda: self._store.get_step(key, step)),  # type: ignore[arg-type,return-value]
                lambda key, epoch: self._load(lambda: self._store.epoch_steps(key, epoch)),  # type: ignore[arg-type,return-value]
            )
            if not outcome.duplicate:
                now = self._now_ms()
                key = session.key
                if outcome.amended:
                    self._persist(key.job_id, lambda: self._store.replace_step(key, outcome.record, now))
                    self._versions[key] = self._versions.get(key, 0) + 1  # cached history pages are stale
                elif outcome.filled is None:
                    self._persist(key.job_id, lambda: self._store.append_step(key, outcome.record, now))
                else:  # with the earlier step whose deferred Fisher values came with this report
                    self._persist(
                        key.job_id, lambda: self._store.append_step(key, outcome.record, now, filled=outcome.filled)
                    )
                session.commit_report(outcome)
                session.last_active_ms = now
                entry = self._charged.get(key)
                if entry is None or entry[1] != session.cached_answers:
                    self._account(session)
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
        session = self._live(key)
        with self._locked(session):
            outcome = session.plan_end_epoch(
                epoch, measured, lambda k, step: self._load(lambda: self._store.get_step(k, step))  # type: ignore[arg-type,return-value]
            )
            if not outcome.duplicate:
                now = self._now_ms()
                args = (key, outcome.closed, outcome.next_epoch, outcome.next_window, now)
                if outcome.filled is None:
                    self._persist(key.job_id, lambda: self._store.close_epoch(*args))
                else:  # with the last step, whose deferred Fisher values came with the EndEpoch
                    self._persist(key.job_id, lambda: self._store.close_epoch(*args, filled=outcome.filled))
                session.commit_end_epoch(outcome)
                session.last_active_ms = now
                self._account(session)
                self._observer.epoch_closed(session.config, outcome.closed, outcome.next_window)
        return session.config, outcome

    def close(self, key: SessionKey) -> SessionView:
        return self._end(key, SessionStatus.CLOSED)

    def _end(self, key: SessionKey, status: SessionStatus, idle_before_ms: Optional[int] = None) -> SessionView:
        """Ends an open session (``idle_before_ms``: only if it was idle since then)."""
        with self._jobs.hold(key.job_id, self._wait_s):
            session = self._live(key)
            with self._locked(session):
                ended = session.status == SessionStatus.OPEN and (
                    idle_before_ms is None or session.last_active_ms < idle_before_ms
                )
                if ended:
                    now = self._now_ms()
                    self._persist(key.job_id, lambda: self._store.set_status(key, status, now))
                    session.last_active_ms = now
                    session.deactivate(status)
                    with self._lock:
                        self._retire_locked(session)
                view = session.view()
            if ended:
                self._account(session)
                self._observer.session_ended(session.config, status)
        return view

    def expire_idle(self) -> list[SessionKey]:
        """Expires (persistently) every open session idle for longer than the TTL."""
        ttl_ms = self.limits.session_ttl_s * 1000
        if ttl_ms <= 0:
            return []
        cutoff = self._now_ms() - ttl_ms
        with self._lock:
            idle = [s.key for s in self._open.values() if s.last_active_ms < cutoff]
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
        with self._lock:
            skip = frozenset(self._corrupt)
        pruned: list[SessionKey] = []
        while True:
            try:
                done = self._store.prune_steps(now - retention_ms, now, PRUNE_ROWS, skip)
            except StoreError as exc:
                log.warning("pruning step records failed: %s", exc)
                break
            for key in done:
                self.pages.forget(key)
                with self._lock:
                    session = self._inactive.get(key)
                if session is not None:
                    session.steps_pruned_ms = now
                log.info("pruned the step records of %s (ended more than %.0fs ago)", key, self.limits.step_retention_s)
            pruned += done
            if not done:
                break
        return pruned

    # -- reads ------------------------------------------------------------------------------

    def snapshot(self, job_id: str, attempt: Optional[int] = None) -> HistorySnapshot:
        session = self._find(job_id, attempt)
        with self._locked(session):
            view = session.view()
            epochs = session.epochs()
            pruned = session.steps_pruned_ms
        return HistorySnapshot(session.key, view, epochs, self._versions.get(session.key, 0), pruned)

    def history_page(
        self, snap: HistorySnapshot, start: int, max_steps: int, encode: Callable[[StepRecord], bytes],
        max_bytes: int = MAX_PAGE_BYTES,
    ) -> Page:
        """Recorded steps from ``start`` as encoded ``steps`` fields (no session lock is held:
        the records come from the store and the page cache)."""
        key = snap.key
        return self.pages.page(
            key,
            snap.version,
            snap.view.last_step,
            start,
            max_steps,
            lambda first, last, limit: self._load(lambda: self._store.step_range(key, first, last, limit)),  # type: ignore[arg-type,return-value]
            encode,
            max_bytes,
        )

    def list(self, include_inactive: bool = False, limit: int = 0) -> list[Union[SessionView, Quarantined]]:
        """Open sessions and quarantined ones; with ``include_inactive`` also the newest ended ones."""
        with self._lock:
            sessions = list(self._open.values())
        if include_inactive:
            cap = min(limit or self.limits.max_listed_inactive, self.limits.max_listed_inactive)
            keys = self._load(lambda: self._store.inactive_keys(cap))
            for k in keys:  # type: ignore[union-attr]
                try:
                    s = self._get(k)
                except DataLoss:
                    continue  # listed below, as quarantined
                if s is not None:
                    sessions.append(s)
        out: list[Union[SessionView, Quarantined]] = []
        for s in sessions:
            with self._locked(s):
                out.append(s.view())
        with self._lock:
            out += list(self._corrupt.values())
        keyed = {_key_of(v): v for v in out}
        return sorted(keyed.values(), key=lambda v: (_key_of(v).job_id, _key_of(v).attempt))


def _key_of(v: Union[SessionView, Quarantined]) -> SessionKey:
    return v.config.key if isinstance(v, SessionView) else v.key
