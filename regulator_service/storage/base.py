"""The storage interface the session manager writes through.

The manager calls it at every durable point (session opened, step answered, epoch closed,
status changed) while it holds the session's lock, and applies a change to memory only after the
store accepted it: a failed write leaves memory and disk as they were.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from ..model import EpochSummary, SessionConfig, SessionKey, SessionStatus, StepRecord
from ..policy import Window


class StoreError(Exception):
    """The store cannot be used (corrupt file, unknown schema version, I/O failure)."""


class StoreTimeout(StoreError):
    """A call did not complete in time and was withdrawn: nothing was changed."""


class StoreInDoubt(StoreError):
    """A write did not complete in time while the store was executing it (a hung disk): it may
    still commit. ``on_resolved(fn)`` calls ``fn()`` once its outcome is known, so that the
    caller can re-read what was really stored."""

    def __init__(self, message: str, on_resolved: "Callable[[Callable[[], None]], None]") -> None:
        super().__init__(message)
        self.on_resolved = on_resolved


class SessionFenced(StoreError):
    """A write of a session was refused by the store's guard for that session (a replica whose
    lease on it was taken over): nothing was written."""


class CorruptRecord(StoreError):
    """A stored record of one session cannot be decoded; the session is quarantined, its rows
    are left as they are, and every other session is served."""

    def __init__(self, key: SessionKey, reason: str) -> None:
        super().__init__(f"session {key} has a record that cannot be decoded: {reason}")
        self.key = key
        self.reason = reason


class StateDirLocked(StoreError):
    """Another regulator (``pid`` if known) serves this state directory."""

    def __init__(self, message: str, pid: Optional[int]) -> None:
        super().__init__(message)
        self.pid = pid


@dataclass(frozen=True)
class Quarantined:
    """A session whose stored records cannot be decoded: what is known of it without decoding."""

    key: SessionKey
    reason: str
    created_ms: int = 0
    last_active_ms: int = 0


@dataclass(frozen=True)
class StoredSession:
    """Everything needed to rebuild one session in memory after a restart."""

    config: SessionConfig
    status: SessionStatus
    created_ms: int
    last_active_ms: int
    closed_epochs: tuple[EpochSummary, ...]
    open_epoch: int
    open_window: tuple[Window, ...]
    open_steps: tuple[StepRecord, ...]  # steps of the open epoch, in step order
    step_count: int
    last_step: int  # -1 before the first step
    steps_pruned_ms: int = 0  # > 0: its step records were pruned then (retention); epochs kept


class StateStore(ABC):
    """Durable session state. Implementations must be safe to call from several threads.

    Every write carries ``at_ms``, the session's last-activity time, so that an idle-session
    TTL survives restarts and a restored session reads back exactly as it was.
    """

    # True for a store whose records live in this process and count against the memory budget
    # (``regulator serve --in-memory``): nothing a session holds can be spilled to it.
    in_budget: bool = False

    @abstractmethod
    def create_session(
        self,
        config: SessionConfig,
        created_ms: int,
        window: tuple[Window, ...],
        supersedes: Optional[SessionKey] = None,
        inherited: tuple[EpochSummary, ...] = (),
    ) -> None:
        """Records a new session with the ``inherited`` closed epochs and the next epoch open
        with ``window``, marking ``supersedes`` as superseded in the same transaction."""

    @abstractmethod
    def set_status(self, key: SessionKey, status: SessionStatus, at_ms: int) -> None: ...

    @abstractmethod
    def append_step(
        self, key: SessionKey, record: StepRecord, at_ms: int, filled: Optional[StepRecord] = None
    ) -> None:
        """Records a new step; ``filled`` (an earlier step whose deferred Fisher values arrived
        with this report) overwrites that step's record in the same transaction."""

    @abstractmethod
    def replace_step(self, key: SessionKey, record: StepRecord, at_ms: int) -> None:
        """Overwrites a recorded step (a late fallback report amends it)."""

    @abstractmethod
    def close_epoch(
        self,
        key: SessionKey,
        closed: EpochSummary,
        next_epoch: int,
        next_window: tuple[Window, ...],
        at_ms: int,
        filled: Optional[StepRecord] = None,
    ) -> None:
        """Stores a closed epoch and opens the next one, atomically, with ``filled`` (the last
        step, whose deferred Fisher values arrived with the EndEpoch) overwriting its record."""

    @abstractmethod
    def get_step(self, key: SessionKey, step: int) -> Optional[StepRecord]: ...

    @abstractmethod
    def iter_steps(self, key: SessionKey) -> Iterator[StepRecord]:
        """Every recorded step of a session, in step order."""

    @abstractmethod
    def epoch_steps(self, key: SessionKey, epoch: int) -> list[StepRecord]:
        """The recorded steps of one epoch, in step order."""

    @abstractmethod
    def step_range(self, key: SessionKey, first: int, last: int, limit: int) -> list[StepRecord]:
        """Up to ``limit`` recorded steps numbered ``first`` to ``last`` (inclusive), in step
        order: one page of history."""

    @abstractmethod
    def load(self, open_only: bool = True) -> list[Union[StoredSession, Quarantined]]:
        """Sessions to restore at start-up (only the open ones by default: the rest stays on
        disk and is loaded on demand). Each session is decoded on its own: one whose records
        cannot be decoded comes back ``Quarantined`` and the others load."""

    @abstractmethod
    def load_session(self, key: SessionKey) -> Optional[StoredSession]:
        """One session (``CorruptRecord`` if it cannot be decoded)."""

    @abstractmethod
    def latest_attempt(self, job_id: str) -> Optional[int]: ...

    def closed_epochs(self, key: SessionKey, first: int, last: int) -> list[EpochSummary]:
        """The session's closed epochs numbered ``first`` to ``last`` (inclusive), in order: an
        open session keeps only its newest in memory (``core/accounting.py``). This default
        reads the whole session; a store with an index reads just the range."""
        stored = self.load_session(key)
        return [] if stored is None else list(stored.closed_epochs[max(first, 0) : last + 1])

    def attempt_opened_by(self, job_id: str, open_token: str) -> Optional[int]:
        """The job's lowest attempt opened with ``open_token`` (``OpenSession(next_attempt)``),
        None if none: a replayed token of a superseded attempt is refused as stale. This default
        reads every attempt; a store with an index answers it with one query."""
        latest = self.latest_attempt(job_id)
        for attempt in range(0 if latest is None else latest + 1):
            try:
                stored = self.load_session(SessionKey(job_id, attempt))
            except CorruptRecord:
                continue
            if stored is not None and stored.config.open_token == open_token:
                return attempt
        return None

    @abstractmethod
    def inactive_keys(self, limit: int) -> list[SessionKey]:
        """Up to ``limit`` sessions that are not open, newest first."""

    def prune_steps(
        self, ended_before_ms: int, now_ms: int, max_rows: int, skip: frozenset[SessionKey] = frozenset()
    ) -> list[SessionKey]:
        """Deletes up to ``max_rows`` step records of sessions that ended (closed, superseded,
        expired) before ``ended_before_ms``, keeping their epochs and windows, never touching
        the sessions in ``skip``; returns the sessions whose steps are now all gone (marked
        pruned at ``now_ms``). The default keeps everything."""
        return []

    def health(self) -> Optional[str]:
        """Why writes fail right now (disk full, locked, file removed), or None when healthy."""
        return None

    def probe(self) -> Optional[str]:
        """Tries a small write when unhealthy, so that recovery is noticed without traffic;
        returns ``health()`` afterwards."""
        return self.health()

    def close(self) -> None:
        """Flushes and releases resources."""
