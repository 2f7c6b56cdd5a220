"""The storage interface the session manager writes through.

The manager calls it at every durable point (session opened, step answered, epoch closed,
status changed) while it holds the session's lock, and applies a change to memory only after the
store accepted it: a failed write leaves memory and disk as they were.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Optional

from ..model import EpochSummary, SessionConfig, SessionKey, SessionStatus, StepRecord
from ..policy import Window


class StoreError(Exception):
    """The store cannot be used (corrupt file, unknown schema version, I/O failure)."""


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


class StateStore(ABC):
    """Durable session state. Implementations must be safe to call from several threads.

    Every write carries ``at_ms``, the session's last-activity time, so that an idle-session
    TTL survives restarts and a restored session reads back exactly as it was.
    """

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
    def append_step(self, key: SessionKey, record: StepRecord, at_ms: int) -> None: ...

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
    ) -> None:
        """Stores a closed epoch and opens the next one, atomically."""

    @abstractmethod
    def get_step(self, key: SessionKey, step: int) -> Optional[StepRecord]: ...

    @abstractmethod
    def iter_steps(self, key: SessionKey) -> Iterator[StepRecord]:
        """Every recorded step of a session, in step order."""

    @abstractmethod
    def epoch_steps(self, key: SessionKey, epoch: int) -> list[StepRecord]:
        """The recorded steps of one epoch, in step order."""

    @abstractmethod
    def load(self, open_only: bool = True) -> list[StoredSession]:
        """Sessions to restore at start-up (only the open ones by default: the rest stays on
        disk and is loaded on demand)."""

    @abstractmethod
    def load_session(self, key: SessionKey) -> Optional[StoredSession]: ...

    @abstractmethod
    def latest_attempt(self, job_id: str) -> Optional[int]: ...

    @abstractmethod
    def inactive_keys(self, limit: int) -> list[SessionKey]:
        """Up to ``limit`` sessions that are not open, newest first."""

    def close(self) -> None:
        """Flushes and releases resources."""
