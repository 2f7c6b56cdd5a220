"""The session manager: all sessions of one server, thread-safe, persisted at every durable point.

Memory is bounded: open sessions are capped (``max_open_sessions``), inactive ones (closed,
superseded, expired) are kept in a small LRU and otherwise read back from the store on demand,
and each session caches only its last answers. Lock order is manager lock, then a session's
lock; the manager lock is held only to find, create or retire sessions, so reports of different
jobs never wait on each other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Optional

from .errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from .model import (
    EpochSummary,
    Limits,
    RawReport,
    SessionConfig,
    SessionDetail,
    SessionKey,
    SessionStatus,
    SessionView,
    StepRecord,
)
from .observer import NullObserver, SessionObserver
from .session import EpochOutcome, Session, StepOutcome
from .storage import StateStore, StoreError

log = logging.getLogger(__name__)


class SessionManager:
    def __init__(
        self,
        store: StateStore,
        observer: Optional[SessionObserver] = None,
        limits: Limits = Limits(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._observer: SessionObserver = observer or NullObserver()
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[SessionKey, Session] = {}
        self._inactive: OrderedDict[SessionKey, Session] = OrderedDict()
        self._latest: dict[str, int] = {}  # job id -> attempt of its open session

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- lifecycle --------------------------------------------------------------------------

    def restore(self) -> int:
        """Loads the open sessions from the store; returns how many."""
        stored = self._store.load(open_only=True)
        with self._lock:
            for s in stored:
                session = Session.restore(s)
                self._open[session.key] = session
                job = s.config.job_id
                self._latest[job] = max(self._latest.get(job, -1), s.config.attempt)
                self._observer.session_opened(session.config, session.view().window)
        return len(stored)

    def _persist(self, write: Callable[[], None]) -> None:
        try:
            write()
        except StoreError as exc:
            log.error("state store write failed: %s", exc)
            raise Unavailable(f"state store write failed, nothing was changed: {exc}") from exc

    def _load(self, read: Callable[[], object]) -> object:
        try:
            return read()
        except StoreError as exc:
            log.error("state store read failed: %s", exc)
            raise Unavailable(f"state store read failed: {exc}") from exc

    # -- lookups (call with self._lock held) -------------------------------------------------

    def _latest_attempt(self, job_id: str) -> Optional[int]:
        attempt = self._latest.get(job_id)
        if attempt is None:
            attempt = self._load(lambda: self._store.latest_attempt(job_id))  # type: ignore[assignment]
        return attempt

    def _get(self, key: SessionKey) -> Optional[Session]:
        session = self._open.get(key)
        if session is not None:
            return session
        session = self._inactive.get(key)
        if session is None:
            stored = self._load(lambda: self._store.load_session(key))
            if stored is None:
                return None
            session = Session.restore(stored)  # type: ignore[arg-type]
            session.deactivate(session.status)
        self._remember_inactive(session)
        return session

    def _remember_inactive(self, session: Session) -> None:
        self._inactive[session.key] = session
        self._inactive.move_to_end(session.key)
        while len(self._inactive) > self.limits.inactive_cache:
            self._inactive.popitem(last=False)

    def _retire(self, session: Session, status: SessionStatus) -> None:
        """Moves an open session to the inactive cache (manager lock and session lock held)."""
        session.deactivate(status)
        self._open.pop(session.key, None)
        if self._latest.get(session.key.job_id) == session.key.attempt:
            del self._latest[session.key.job_id]
        self._remember_inactive(session)

    def _live(self, key: SessionKey) -> Session:
        """The session a write addresses, with attempt fencing."""
        with self._lock:
            latest = self._latest_attempt(key.job_id)
            if latest is None:
                raise NotFound(f"no session for job {key.job_id!r}; call OpenSession first")
            if key.attempt < latest:
                raise FailedPrecondition(
                    f"attempt {key.attempt} of job {key.job_id!r} is stale: attempt {latest} "
                    "superseded it"
                )
            session = self._get(key)
            if session is None:
                raise NotFound(f"attempt {key.attempt} of job {key.job_id!r} was never opened")
            return session

    def _find(self, job_id: str, attempt: Optional[int]) -> Session:
        with self._lock:
            if attempt is None:
                attempt = self._latest_attempt(job_id)
            session = None if attempt is None else self._get(SessionKey(job_id, attempt))
        if session is None:
            which = f"job {job_id!r}" if attempt is None else f"attempt {attempt} of job {job_id!r}"
            raise NotFound(f"no session for {which}")
        return session

    # -- operations -------------------------------------------------------------------------

    def open(self, config: SessionConfig) -> tuple[SessionView, bool]:
        """Creates a session, or returns the identical open one (``created`` False)."""
        with self._lock:
            latest = self._latest_attempt(config.job_id)
            previous: Optional[Session] = None
            if latest is not None:
                if config.attempt < latest:
                    raise FailedPrecondition(
                        f"attempt {config.attempt} of job {config.job_id!r} is stale: attempt "
                        f"{latest} is the latest"
                    )
                previous = self._get(SessionKey(config.job_id, latest))
                if previous is not None and config.attempt == latest:
                    with previous.lock:
                        if previous.config != config:
                            raise AlreadyExists(
                                f"job {config.job_id!r} attempt {config.attempt} exists with a "
                                "different configuration; use a new job id or a higher attempt"
                            )
                        previous.require_open()
                        return previous.view(), False
            if len(self._open) >= self.limits.max_open_sessions:
                raise ResourceExhausted(
                    f"{len(self._open)} sessions are open, the limit is {self.limits.max_open_sessions}"
                )
            inherited = self._inherited(config, previous)
            session = Session.new(config, self._now_ms(), inherited)
            window = session.view().window
            superseded = previous if previous is not None and previous.status == SessionStatus.OPEN else None
            if superseded is not None:
                with superseded.lock:
                    self._persist(
                        lambda: self._store.create_session(
                            config, session.created_ms, window, superseded.key, inherited
                        )
                    )
                    self._retire(superseded, SessionStatus.SUPERSEDED)
                self._observer.session_ended(superseded.config, SessionStatus.SUPERSEDED)
            else:
                self._persist(
                    lambda: self._store.create_session(config, session.created_ms, window, None, inherited)
                )
            self._open[config.key] = session
            self._latest[config.job_id] = config.attempt
            self._observer.session_opened(config, window)
        return session.view(), True

    @staticmethod
    def _inherited(config: SessionConfig, previous: Optional[Session]) -> tuple[EpochSummary, ...]:
        """The closed epochs an elastic restart resumes after (manager lock held)."""
        n = config.resume_epoch
        if n == 0:
            return ()
        if previous is None:
            raise FailedPrecondition(
                f"cannot resume job {config.job_id!r} at epoch {n}: it has no previous attempt"
            )
        with previous.lock:
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
        return tuple(closed[:n])

    def report(self, raw: RawReport) -> tuple[SessionConfig, StepOutcome]:
        """Answers one step; returns the session's config with the outcome."""
        session = self._live(raw.key)
        with session.lock:
            # store reads go through _load: a failing store is UNAVAILABLE, never INTERNAL
            outcome = session.plan_report(
                raw,
                lambda key, step: self._load(lambda: self._store.get_step(key, step)),  # type: ignore[arg-type,return-value]
                lambda key, epoch: self._load(lambda: self._store.epoch_steps(key, epoch)),  # type: ignore[arg-type,return-value]
            )
            if not outcome.duplicate:
                now = self._now_ms()
                write = self._store.replace_step if outcome.amended else self._store.append_step
                self._persist(lambda: write(session.key, outcome.record, now))
                session.commit_report(outcome)
                session.last_active_ms = now
            # inside the lock, so that gauges follow the steps' order
            self._observer.step_recorded(
                session.config, outcome.record, outcome.window, outcome.duplicate
            )
        return session.config, outcome

    def end_epoch(self, key: SessionKey, epoch: int) -> tuple[SessionConfig, EpochOutcome]:
        session = self._live(key)
        with session.lock:
            outcome = session.plan_end_epoch(epoch)
            if not outcome.duplicate:
                now = self._now_ms()
                self._persist(
                    lambda: self._store.close_epoch(
                        key, outcome.closed, outcome.next_epoch, outcome.next_window, now
                    )
                )
                session.commit_end_epoch(outcome)
                session.last_active_ms = now
                self._observer.epoch_closed(session.config, outcome.closed, outcome.next_window)
        return session.config, outcome

    def close(self, key: SessionKey) -> SessionView:
        return self._end(key, SessionStatus.CLOSED)

    def _end(self, key: SessionKey, status: SessionStatus) -> SessionView:
        session = self._live(key)
        with self._lock, session.lock:
            ended = session.status == SessionStatus.OPEN
            if ended:
                now = self._now_ms()
                self._persist(lambda: self._store.set_status(key, status, now))
                session.last_active_ms = now
                self._retire(session, status)
            view = session.view()
        if ended:
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
                session = self._live(key)
                with self._lock, session.lock:
                    if session.status != SessionStatus.OPEN or session.last_active_ms >= cutoff:
                        continue  # it came back to life meanwhile
                    now = self._now_ms()
                    self._persist(lambda: self._store.set_status(key, SessionStatus.EXPIRED, now))
                    session.last_active_ms = now
                    self._retire(session, SessionStatus.EXPIRED)
                self._observer.session_ended(session.config, SessionStatus.EXPIRED)
                expired.append(key)
                log.info("session %s expired after %.0fs idle", key, self.limits.session_ttl_s)
            except (Unavailable, FailedPrecondition, NotFound) as exc:
                log.warning("could not expire %s: %s", key, exc)
        return expired

    def get(self, job_id: str, attempt: Optional[int] = None, include_steps: bool = False) -> SessionDetail:
        session = self._find(job_id, attempt)
        with session.lock:
            view = session.view()
            epochs = session.epochs()
            steps = tuple(self._load(lambda: list(self._store.iter_steps(session.key)))) if include_steps else ()  # type: ignore[arg-type]
        return SessionDetail(view, epochs, steps)

    def list(self, include_inactive: bool = False, limit: int = 0) -> list[SessionView]:
        with self._lock:
            sessions = list(self._open.values())
            if include_inactive:
                cap = min(limit or self.limits.max_listed_inactive, self.limits.max_listed_inactive)
                keys = self._load(lambda: self._store.inactive_keys(cap))
                sessions += [s for s in (self._get(k) for k in keys) if s is not None]  # type: ignore[union-attr]
        views = []
        for s in sessions:
            with s.lock:
                views.append(s.view())
        return sorted(views, key=lambda v: (v.config.job_id, v.config.attempt))

    def close_store(self) -> None:
        self._store.close()
