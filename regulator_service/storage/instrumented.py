"""A store decorator that times every durable write, so storage backends stay metric-free."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, TypeVar, Union

from ..model import EpochSummary, SessionConfig, SessionKey, SessionStatus, StepRecord
from ..policy import Window
from .base import Quarantined, StateStore, StoredSession

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

    def append_step(
        self, key: SessionKey, record: StepRecord, at_ms: int, filled: Optional[StepRecord] = None
    ) -> None:
        self._timed("append_step", lambda: self.inner.append_step(key, record, at_ms, filled))

    def replace_step(self, key: SessionKey, record: StepRecord, at_ms: int) -> None:
        self._timed("replace_step", lambda: self.inner.replace_step(key, record, at_ms))

    def close_epoch(
        self,
        key: SessionKey,
        closed: EpochSummary,
        next_epoch: int,
        next_window: tuple[Window, ...],
        at_ms: int,
        filled: Optional[StepRecord] = None,
    ) -> None:
        self._timed(
            "close_epoch", lambda: self.inner.close_epoch(key, closed, next_epoch, next_window, at_ms, filled)
        )

    def get_step(self, key: SessionKey, step: int) -> Optional[StepRecord]:
        return self.inner.get_step(key, step)

    def iter_steps(self, key: SessionKey) -> Iterator[StepRecord]:
        return self.inner.iter_steps(key)

    def epoch_steps(self, key: SessionKey, epoch: int) -> list[StepRecord]:
        return self.inner.epoch_steps(key, epoch)

    def step_range(self, key: SessionKey, first: int, last: int, limit: int) -> list[StepRecord]:
        return self.inner.step_range(key, first, last, limit)

    def load(self, open_only: bool = True) -> list[Union[StoredSession, Quarantined]]:
        return self.inner.load(open_only)

    def load_session(self, key: SessionKey) -> Optional[StoredSession]:
        return self.inner.load_session(key)

    def latest_attempt(self, job_id: str) -> Optional[int]:
        return self.inner.latest_attempt(job_id)

    @property
    def in_budget(self) -> bool:  # type: ignore[override]
        return self.inner.in_budget

    def closed_epochs(self, key: SessionKey, first: int, last: int) -> list[EpochSummary]:
        return self.inner.closed_epochs(key, first, last)

    def attempt_opened_by(self, job_id: str, open_token: str) -> Optional[int]:
        return self.inner.attempt_opened_by(job_id, open_token)

    def inactive_keys(self, limit: int) -> list[SessionKey]:
        return self.inner.inactive_keys(limit)

    def prune_steps(
        self, ended_before_ms: int, now_ms: int, max_rows: int, skip: frozenset[SessionKey] = frozenset()
    ) -> list[SessionKey]:
        return self._timed("prune_steps", lambda: self.inner.prune_steps(ended_before_ms, now_ms, max_rows, skip))  # type: ignore[call-arg]

    def health(self) -> Optional[str]:
        return self.inner.health()

    def probe(self) -> Optional[str]:
        return self.inner.probe()

    def close(self) -> None:
        self.inner.close()
