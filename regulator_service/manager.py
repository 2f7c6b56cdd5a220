"""The session manager: all sessions of one server, thread-safe, persisted at every durable point.

Lock order is manager lock, then a session's lock; the manager lock is held only to find or
create sessions, so reports of different jobs never wait on each other.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from .errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from .model import EpochSummary, RawReport, SessionConfig, SessionKey, SessionStatus, StepRecord
from .observer import NullObserver, SessionObserver
from .session import EpochOutcome, Session, SessionView, StepOutcome
from .storage import StateStore, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Resource bounds; beyond them a request is RESOURCE_EXHAUSTED."""

    max_open_sessions: int = 1024
    max_modalities: int = 16


@dataclass(frozen=True)
class SessionDetail:
    view: SessionView
    epochs: tuple[EpochSummary, ...]
    steps: tuple[StepRecord, ...]


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
        self._sessions: dict[SessionKey, Session] = {}
        self._latest: dict[str, int] = {}  # job id -> highest attempt opened

    # -- lifecycle --------------------------------------------------------------------------

    def restore(self) -> int:
        """Loads every stored session; returns how many are open."""
        stored = self._store.load()
        with self._lock:
            for s in stored:
                session = Session.restore(s)
                self._sessions[session.key] = session
                job = s.config.job_id
                self._latest[job] = max(self._latest.get(job, -1), s.config.attempt)
                if session.status == SessionStatus.OPEN:
                    self._observer.session_opened(session.config, session.view().window)
        return sum(1 for s in stored if s.status == SessionStatus.OPEN)

    def _persist(self, write: Callable[[], None]) -> None:
        try:
            write()
        except StoreError as exc:
            log.error("state store write failed: %s", exc)
            raise Unavailable(f"state store write failed, nothing was changed: {exc}") from exc

    # -- lookups ----------------------------------------------------------------------------

    def _live(self, key: SessionKey) -> Session:
        """The session a write addresses, with attempt fencing."""
        with self._lock:
            latest = self._latest.get(key.job_id)
            if latest is None:
                raise NotFound(f"no session for job {key.job_id!r}; call OpenSession first")
            if key.attempt < latest:
                raise FailedPrecondition(
                    f"attempt {key.attempt} of job {key.job_id!r} is stale: attempt {latest} "
                    "superseded it"
                )
            session = self._sessions.get(key)
            if session is None:
                raise NotFound(f"attempt {key.attempt} of job {key.job_id!r} was never opened")
            return session

    def _find(self, job_id: str, attempt: Optional[int]) -> Session:
        with self._lock:
            if attempt is None:
                attempt = self._latest.get(job_id)
            session = None if attempt is None else self._sessions.get(SessionKey(job_id, attempt))
        if session is None:
            which = f"job {job_id!r}" if attempt is None else f"attempt {attempt} of job {job_id!r}"
            raise NotFound(f"no session for {which}")
        return session

    # -- operations -------------------------------------------------------------------------

    def open(self, config: SessionConfig) -> tuple[SessionView, bool]:
        """Creates a session, or returns the identical live one (``created`` False)."""
        with self._lock:
            latest = self._latest.get(config.job_id)
            superseded: Optional[Session] = None
            if latest is not None:
                if config.attempt < latest:
                    raise FailedPrecondition(
                        f"attempt {config.attempt} of job {config.job_id!r} is stale: attempt "
                        f"{latest} is live"
                    )
                existing = self._sessions[SessionKey(config.job_id, latest)]
                if config.attempt == latest:
                    with existing.lock:
                        if existing.config != config:
                            raise AlreadyExists(
                                f"job {config.job_id!r} attempt {config.attempt} is open with a "
                                "different configuration; use a new job id or a higher attempt"
                            )
                        existing.require_open()
                        return existing.view(), False
                superseded = existing
            open_now = sum(1 for s in self._sessions.values() if s.status == SessionStatus.OPEN)
            if open_now >= self.limits.max_open_sessions:
                raise ResourceExhausted(
                    f"{open_now} sessions are open, the limit is {self.limits.max_open_sessions}"
                )
            session = Session.new(config, int(self._clock() * 1000))
            window = session.view().window
            if superseded is not None:
                with superseded.lock:
                    self._persist(
                        lambda: self._store.create_session(
                            config, session.created_ms, window, supersedes=superseded.key
                        )
                    )
                    was_open = superseded.status == SessionStatus.OPEN
                    superseded.status = SessionStatus.SUPERSEDED
                if was_open:
                    self._observer.session_ended(superseded.config, SessionStatus.SUPERSEDED)
            else:
                self._persist(lambda: self._store.create_session(config, session.created_ms, window))
            self._sessions[config.key] = session
            self._latest[config.job_id] = config.attempt
        self._observer.session_opened(config, window)
        return session.view(), True

    def report(self, raw: RawReport) -> tuple[SessionConfig, StepOutcome]:
        """Answers one step; returns the session's config with the outcome."""
        session = self._live(raw.key)
        with session.lock:
            outcome = session.plan_report(raw, self._store.get_step)
            if not outcome.duplicate:
                self._persist(lambda: self._store.append_step(session.key, outcome.record))
                session.commit_report(outcome)
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
                self._persist(
                    lambda: self._store.close_epoch(
                        key, outcome.closed, outcome.next_epoch, outcome.next_window
                    )
                )
                session.commit_end_epoch(outcome)
                self._observer.epoch_closed(session.config, outcome.closed, outcome.next_window)
        return session.config, outcome

    def close(self, key: SessionKey) -> SessionView:
        session = self._live(key)
        with session.lock:
            if session.status == SessionStatus.OPEN:
                self._persist(lambda: self._store.set_status(key, SessionStatus.CLOSED))
                session.status = SessionStatus.CLOSED
                ended = True
            else:
                ended = False
            view = session.view()
        if ended:
            self._observer.session_ended(session.config, SessionStatus.CLOSED)
        return view

    def get(self, job_id: str, attempt: Optional[int] = None, include_steps: bool = False) -> SessionDetail:
        session = self._find(job_id, attempt)
        with session.lock:
            view = session.view()
            epochs = session.epochs()
            steps = tuple(self._store.iter_steps(session.key)) if include_steps else ()
        return SessionDetail(view, epochs, steps)

    def list(self, include_inactive: bool = False) -> list[SessionView]:
        with self._lock:
            sessions = list(self._sessions.values())
        views = []
        for s in sessions:
            with s.lock:
                if include_inactive or s.status == SessionStatus.OPEN:
                    views.append(s.view())
        return sorted(views, key=lambda v: (v.config.job_id, v.config.attempt))

    def iter_steps(self, job_id: str, attempt: Optional[int] = None) -> Iterator[StepRecord]:
        return self._store.iter_steps(self._find(job_id, attempt).key)

    def close_store(self) -> None:
        self._store.close()
