"""In-memory store: the default when no state directory is given, and the test double that
still exercises the manager's durable-point protocol. Survives a manager rebuild (``load``) but
not the process."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional

from ..model import EpochSummary, SessionConfig, SessionKey, SessionStatus, StepRecord
from ..policy import Window
from .base import StateStore, StoredSession


@dataclass
class _Row:
    config: SessionConfig
    status: SessionStatus
    created_ms: int
    open_epoch: int
    open_window: tuple[Window, ...]
    epochs: list[EpochSummary] = field(default_factory=list)
    steps: dict[int, StepRecord] = field(default_factory=dict)  # insertion = step order


class MemoryStore(StateStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[SessionKey, _Row] = {}

    def create_session(
        self,
        config: SessionConfig,
        created_ms: int,
        window: tuple[Window, ...],
        supersedes: Optional[SessionKey] = None,
    ) -> None:
        with self._lock:
            if supersedes is not None:
                self._rows[supersedes].status = SessionStatus.SUPERSEDED
            self._rows[config.key] = _Row(config, SessionStatus.OPEN, created_ms, 0, window)

    def set_status(self, key: SessionKey, status: SessionStatus) -> None:
        with self._lock:
            self._rows[key].status = status

    def append_step(self, key: SessionKey, record: StepRecord) -> None:
        with self._lock:
            self._rows[key].steps[record.step] = record

    def close_epoch(
        self, key: SessionKey, closed: EpochSummary, next_epoch: int, next_window: tuple[Window, ...]
    ) -> None:
        with self._lock:
            row = self._rows[key]
            row.epochs.append(closed)
            row.open_epoch = next_epoch
            row.open_window = next_window

    def get_step(self, key: SessionKey, step: int) -> Optional[StepRecord]:
        with self._lock:
            row = self._rows.get(key)
            return None if row is None else row.steps.get(step)

    def iter_steps(self, key: SessionKey) -> Iterator[StepRecord]:
        with self._lock:
            records = list(self._rows[key].steps.values())
        return iter(records)

    def load(self) -> list[StoredSession]:
        with self._lock:
            return [
                StoredSession(
                    config=row.config,
                    status=row.status,
                    created_ms=row.created_ms,
                    closed_epochs=tuple(row.epochs),
                    open_epoch=row.open_epoch,
                    open_window=row.open_window,
                    open_steps=tuple(r for r in row.steps.values() if r.epoch == row.open_epoch),
                    step_count=len(row.steps),
                    last_step=max(row.steps, default=-1),
                )
                for row in self._rows.values()
            ]
