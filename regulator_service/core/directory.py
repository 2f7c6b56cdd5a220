"""Where the manager finds a job's sessions: in memory, else in the store, fenced and locked.

It holds what the server keeps of every job (open sessions, a small LRU of inactive ones, each
job's latest attempt, quarantined sessions, jobs with a write of unknown outcome) under one lock
that guards the dictionaries only, and it is the one place that calls the store for the manager:
a failing store is UNAVAILABLE, a record that does not decode quarantines its session (DATA_LOSS),
a write of unknown outcome blocks its job until the store settles it. With several replicas on
one store (``ownership``), a job is served only under its lease: ``claim`` before anything else.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from typing import Callable, Iterator, Optional

from ..errors import DataLoss, FailedPrecondition, NotFound, Unavailable
from ..capacity.history import HistoryPages
from ..model import SessionKey, SessionStatus
from ..storage import StateStore, StoreError
from ..storage.base import CorruptRecord, Quarantined, SessionFenced, StoreInDoubt
from .accounting import SessionMemory
from .observer import SessionObserver
from .ownership import Ownership
from .session import Session

log = logging.getLogger(__name__)


def quarantine_message(q: Quarantined, resuming: bool = False) -> str:
    """Why the session cannot be served, and how its job goes on: a new attempt starts afresh
    beside the untouched rows, and one resuming from a checkpoint needs the checkpoint's own
    copy of the closed epochs (the regulation snapshot ``InfoRegHook.state_dict`` writes)."""
    head = (
        f"session {q.key} is quarantined: its stored records cannot be decoded ({q.reason}); its rows "
        "are left untouched for inspection."
    )
    resume = (
        "A job resuming from a checkpoint continues as a new attempt only with the checkpoint's regulation "
        "snapshot (InfoRegHook.state_dict writes it; OpenSessionRequest.snapshot), from which its closed epochs "
        "are restored; without one, start the job at epoch 0 (resume_epoch 0) or under a new job id."
    )
    return f"{head} {resume}" if resuming else f"{head} Open a new attempt of the job to continue; {resume[0].lower()}{resume[1:]}"


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


class SessionDirectory:
    """The sessions of one server, by key; see the module docstring for the locks."""

    def __init__(
        self, store: StateStore, observer: SessionObserver, memory: SessionMemory, pages: HistoryPages,
        wait_s: float, inactive_cache: int, ownership: Optional[Ownership] = None,
    ) -> None:
        self._store = store
        self.ownership = ownership  # several replicas: the leases of this one
        self._observer = observer
        self._memory = memory
        self._pages = pages
        self._wait_s = wait_s
        self._inactive_cache = inactive_cache
        self.lock = threading.Lock()
        self.jobs = KeyedLocks()
        self.open: dict[SessionKey, Session] = {}
        self.inactive: OrderedDict[SessionKey, Session] = OrderedDict()
        self.latest: dict[str, int] = {}  # job id -> attempt of its open (or quarantined) latest session
        self.corrupt: dict[SessionKey, Quarantined] = {}
        self.in_doubt: set[str] = set()  # jobs with a write of unknown outcome

    # -- for the memory budget's evictors -----------------------------------------------------

    def pop_oldest_inactive(self) -> Optional[Session]:
        with self.lock:
            session = self.inactive.popitem(last=False)[1] if self.inactive else None
        if session is not None:
            self._pages.forget(session.key)  # nothing of a session stays once it leaves memory
        return session

    def open_by_activity(self) -> list[Session]:
        """Open sessions, least recently active first."""
        with self.lock:
            return sorted(self.open.values(), key=lambda s: s.last_active_ms)

    def open_count(self) -> int:
        with self.lock:
            return len(self.open)

    # -- store calls --------------------------------------------------------------------------

    def persist(self, job: str, write: Callable[[], None]) -> None:
        try:
            write()
        except StoreInDoubt as exc:
            with self.lock:
                self.in_doubt.add(job)
            exc.on_resolved(lambda: self.resolved(job))
            raise Unavailable(f"state store write timed out: {exc}") from exc
        except SessionFenced as exc:  # another replica took the job over: what memory holds is stale
            self.forget_job(job)
            if self.ownership is not None:
                self.ownership.forget(job)
            log.warning("a write of job %r was fenced: another replica serves it now", job)
            raise Unavailable(f"job {job!r} is served by another regulator replica now; nothing was changed; retry") from exc
        except StoreError as exc:
            log.error("state store write failed: %s", exc)
            if self.ownership is not None:
                self.ownership.distrust(job)  # the next call asks the database who serves the job
            raise Unavailable(f"state store write failed, nothing was changed: {exc}") from exc

    def load(self, read: Callable[[], object]) -> object:
        try:
            return read()
        except CorruptRecord as exc:
            q = self.quarantine(exc.key, exc.reason)
            raise DataLoss(quarantine_message(q)) from exc
        except StoreError as exc:
            log.error("state store read failed: %s", exc)
            raise Unavailable(f"state store read failed: {exc}") from exc

    def resolved(self, job: str) -> None:
        """A write of ``job`` whose outcome was unknown is settled: forget what memory holds of
        the job, so that its sessions are read back as the store has them."""
        with self.lock:
            self.in_doubt.discard(job)
        self.forget_job(job)
        log.warning("the pending write of job %r is settled; its sessions are re-read from the store", job)

    def forget_job(self, job: str) -> None:
        """Drops what memory holds of ``job``: its sessions are read back from the store."""
        with self.lock:
            self.latest.pop(job, None)
            dropped = [s for s in (*self.open.values(), *self.inactive.values()) if s.key.job_id == job]
            for s in dropped:
                self.open.pop(s.key, None)
                self.inactive.pop(s.key, None)
        for s in dropped:
            self._memory.uncharge(s)
            self._pages.forget(s.key)

    def claim(self, job: str) -> None:
        """Several replicas: this one must hold the job's lease (``ownership.py``) before it
        serves the job; a lease taken with a new token drops the job's memory first
        (``NotOwner``: UNAVAILABLE while another replica holds it). One replica: nothing to do."""
        own = self.ownership
        if own is None or own.holds(job):
            return
        with self.jobs.hold(job, self._wait_s):
            if not own.holds(job):
                own.claim(job, lambda: self.forget_job(job))

    def acquire(self, session: Session) -> None:
        """The session's lock, within the store timeout; then no write of its job may be in doubt
        (one may have gone in doubt while we waited). The caller releases it."""
        if not session.lock.acquire(timeout=self._wait_s):
            raise Unavailable(
                f"session {session.key} is busy: a call on it has not finished within {self._wait_s:g}s "
                "(is the state store slow?); retry"
            )
        if self.in_doubt:
            try:
                self.check_doubt(session.key.job_id)
            except BaseException:
                session.lock.release()
                raise
        if self.ownership is not None and session.status == SessionStatus.OPEN:
            with self.lock:
                current = self.open.get(session.key) is session
            if not current:  # dropped while we waited (its job's lease changed hands): stale
                session.lock.release()
                raise Unavailable(f"session {session.key} was reloaded while this call waited; retry")

    @contextlib.contextmanager
    def locked(self, session: Session) -> Iterator[None]:
        self.acquire(session)
        try:
            yield
        finally:
            session.lock.release()

    def check_doubt(self, job: str) -> None:
        if job in self.in_doubt:
            raise Unavailable(
                f"a write of job {job!r} has not completed (is the state disk hung?); its sessions are "
                "unavailable until the store settles it; retry"
            )

    def quarantine(self, key: SessionKey, reason: str, q: Optional[Quarantined] = None) -> Quarantined:
        """Takes a session out of service: its records do not decode. Its rows are never
        written again; the rest of the server carries on."""
        q = q if q is not None else Quarantined(key, reason)
        with self.lock:
            first = key not in self.corrupt
            self.corrupt[key] = q
            session = self.open.pop(key, None) or self.inactive.pop(key, None)
        if first:
            log.error("quarantined session %s: its stored records cannot be decoded: %s", key, reason)
        if session is not None:
            self._memory.uncharge(session)
            self._pages.forget(key)
            if session.status == SessionStatus.OPEN:
                self._observer.session_ended(session.config, SessionStatus.CORRUPT)
        return q

    def latest_attempt(self, job_id: str) -> Optional[int]:
        """The job's latest attempt (call with the job's lock held)."""
        with self.lock:
            attempt = self.latest.get(job_id)
        if attempt is None:
            attempt = self.load(lambda: self._store.latest_attempt(job_id))  # type: ignore[assignment]
        return attempt

    def attempt_opened_by(self, job_id: str, open_token: str) -> Optional[int]:
        """The job's attempt that ``open_token`` opened, from the store (call with the job's lock held)."""
        return self.load(lambda: self._store.attempt_opened_by(job_id, open_token))  # type: ignore[return-value]

    def get(self, key: SessionKey) -> Optional[Session]:
        """The session in memory, else read from the store (DATA_LOSS if quarantined)."""
        with self.lock:
            session = self.open.get(key)
            if session is None:
                session = self.inactive.get(key)
                if session is not None:
                    self.inactive.move_to_end(key)
            q = self.corrupt.get(key)
        if q is not None:
            raise DataLoss(quarantine_message(q))
        if session is not None:
            return session
        with self.jobs.hold(key.job_id, self._wait_s):
            with self.lock:
                session = self.open.get(key) or self.inactive.get(key)
            if session is not None:
                return session
            stored = self.load(lambda: self._store.load_session(key))
            if stored is None:
                return None
            try:
                session = Session.restore(stored)  # type: ignore[arg-type]
            except Exception as exc:
                q = self.quarantine(key, f"{type(exc).__name__}: {exc}")
                raise DataLoss(quarantine_message(q)) from exc
            self._memory.spill(session)  # not yet seen by other calls
            with self.lock:
                if session.status == SessionStatus.OPEN:  # re-read after a write of unknown outcome
                    self.open[key] = session
                    self.latest[key.job_id] = max(self.latest.get(key.job_id, -1), key.attempt)
                else:
                    session.deactivate(session.status)
                    self.remember_inactive_locked(session)
        self._memory.charge(session)
        return session

    def remember_inactive_locked(self, session: Session) -> None:
        self.inactive[session.key] = session
        self.inactive.move_to_end(session.key)
        while len(self.inactive) > self._inactive_cache:
            _, old = self.inactive.popitem(last=False)
            self._memory.uncharge(old)
            self._pages.forget(old.key)  # its cached history pages: nothing stays per job

    def retire_locked(self, session: Session) -> None:
        """An open session that ended: to the inactive cache (manager lock held)."""
        self.open.pop(session.key, None)
        if self.latest.get(session.key.job_id) == session.key.attempt:
            del self.latest[session.key.job_id]
        self.remember_inactive_locked(session)

    def live(self, key: SessionKey) -> Session:
        """The session a write addresses, with attempt fencing."""
        job = key.job_id
        self.claim(job)
        with self.lock:
            doubtful = job in self.in_doubt
            latest = self.latest.get(job)
            session = self.open.get(key)
        if doubtful:
            self.check_doubt(job)
        if session is not None and latest == key.attempt:
            return session  # the common case: the job's open session
        with self.jobs.hold(job, self._wait_s):
            latest = self.latest_attempt(job)
            if latest is None:
                raise NotFound(f"no session for job {job!r}; call OpenSession first")
            if key.attempt < latest:
                raise FailedPrecondition(
                    f"attempt {key.attempt} of job {job!r} is stale: attempt {latest} superseded it"
                )
            session = self.get(key)
        if session is None:
            raise NotFound(f"attempt {key.attempt} of job {job!r} was never opened")
        return session

    def find(self, job_id: str, attempt: Optional[int]) -> Session:
        self.claim(job_id)
        self.check_doubt(job_id)
        if attempt is None:
            with self.jobs.hold(job_id, self._wait_s):
                attempt = self.latest_attempt(job_id)
        session = None if attempt is None else self.get(SessionKey(job_id, attempt))
        if session is None:
            which = f"job {job_id!r}" if attempt is None else f"attempt {attempt} of job {job_id!r}"
            raise NotFound(f"no session for {which}")
        return session

    def adopt(self, session: Session, superseded: Optional[Session] = None) -> None:
        """A new session is its job's open latest attempt; ``superseded`` (already deactivated,
        its lock held) goes to the inactive cache."""
        with self.lock:
            if superseded is not None:
                self.retire_locked(superseded)
            self.open[session.key] = session
            self.latest[session.key.job_id] = session.key.attempt
