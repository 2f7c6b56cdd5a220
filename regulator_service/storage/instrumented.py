"""A store decorator that times every durable write, so storage backends stay metric-free."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, TypeVar

from ..model import EpochSummary, SessionConfig, SessionKey, SessionStatus, StepRecord
from ..policy import Window
from .base import StateStore, StoredSession

T = TypeVar("T")
Timer = Callable[[str, Callable[[], T]], T]


class InstrumentedStore(StateStore):
    def __init__(self, inner: StateStore, timed: Timer) -> None:
        self.inner = inner
        self._timed = timed

    def create_session(
        self,
        config: SessionConfig,
        created_ms: int,
        window: tuple[Window, ...],
        supersedes: Optional[SessionKey] = None,
        inherited: tuple[EpochSummary, ...] = (),
    ) -> None:
        self._timed(
            "create_session", lambda: self.inner.create_session(config, created_ms, window, supersedes, inherited)
        )

    def set_status(self, key: SessionKey, status: SessionStatus, at_ms: int) -> None:
        self._timed("set_status", lambda: self.inner.set_status(key, status, at_ms))

    def append_step(self, key: SessionKey, record: StepRecord, at_ms: int) -> None:
        self._timed("append_step", lambda: self.inner.append_step(key, record, at_ms))

    def replace_step(self, key: SessionKey, record: StepRecord, at_ms: int) -> None:
        self._timed("replace_step", lambda: self.inner.replace_step(key, record, at_ms))

    def close_epoch(
        self,
        key: SessionKey,
        closed: EpochSummary,
        next_epoch: int,
        next_window: tuple[Window, ...],
        at_ms: int,
    ) -> None:
        self._timed("close_epoch", lambda: self.inner.close_epoch(key, closed, next_epoch, next_window, at_ms))

    def get_step(self, key: SessionKey, step: int) -> Optional[StepRecord]:
        return self.inner.get_step(key, step)

    def iter_steps(self, key: SessionKey) -> Iterator[StepRecord]:
        return self.inner.iter_steps(key)

    def epoch_steps(self, key: SessionKey, epoch: int) -> list[StepRecord]:
        return self.inner.epoch_steps(key, epoch)

    def load(self, open_only: bool = True) -> list[StoredSession]:
        return self.inner.load(open_only)

    def load_session(self, key: SessionKey) -> Optional[StoredSession]:
        return self.inner.load_session(key)

    def latest_attempt(self, job_id: str) -> Optional[int]:
        return self.inner.latest_attempt(job_id)

    def inactive_keys(self, limit: int) -> list[SessionKey]:
        return self.inner.inactive_keys(limit)

    def close(self) -> None:
        self.inner.close()
