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
    ) -> None:
        self._timed("create_session", lambda: self.inner.create_session(config, created_ms, window, supersedes))

    def set_status(self, key: SessionKey, status: SessionStatus) -> None:
        self._timed("set_status", lambda: self.inner.set_status(key, status))

    def append_step(self, key: SessionKey, record: StepRecord) -> None:
        self._timed("append_step", lambda: self.inner.append_step(key, record))

    def close_epoch(
        self, key: SessionKey, closed: EpochSummary, next_epoch: int, next_window: tuple[Window, ...]
    ) -> None:
        self._timed("close_epoch", lambda: self.inner.close_epoch(key, closed, next_epoch, next_window))

    def get_step(self, key: SessionKey, step: int) -> Optional[StepRecord]:
        return self.inner.get_step(key, step)

    def iter_steps(self, key: SessionKey) -> Iterator[StepRecord]:
        return self.inner.iter_steps(key)

    def load(self) -> list[StoredSession]:
        return self.inner.load()

    def close(self) -> None:
        self.inner.close()
