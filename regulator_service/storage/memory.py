"""In-memory store: the default when no state directory is given, and the test double that
still exercises the manager's durable-point protocol. Survives a manager rebuild (``load``) but
not the process."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

from ..model import EpochSummary, SessionConfig, SessionKey, SessionStatus, StepRecord
from ..policy import Window
from .base import Quarantined, StateStore, StoredSession


@dataclass
class _Row:
    config: SessionConfig
    status: SessionStatus
    created_ms: int
    last_active_ms: int
    open_epoch: int
    open_window: tuple[Window, ...]
    epochs: list[EpochSummary] = field(default_factory=list)
    steps: dict[int, StepRecord] = field(default_factory=dict)  # insertion = step order
    order: list[int] = field(default_factory=list)  # the step numbers, ascending (for ranges)
    step_count: int = 0
    last_step: int = -1
    pruned_ms: int = 0


def _of_epoch(row: _Row, epoch: int) -> list[StepRecord]:
    return [r for r in row.steps.values() if r.epoch == epoch]


class MemoryStore(StateStore):
    """``in_budget``: a server's store, its records counted against ``--memory-budget`` (the
    default); False for the client's in-process mode, whose records are its caller's own memory
    (closed epochs are then dropped from sessions and read back from here, like from a file)."""

    def __init__(self, in_budget: bool = True) -> None:
        self.in_budget = in_budget
        self._lock = threading.Lock()
        self._rows: dict[SessionKey, _Row] = {}

    def create_session(
        self,
        config: SessionConfig,
        created_ms: int,
        window: tuple[Window, ...],
        supersedes: Optional[SessionKey] = None,
        inherited: tuple[EpochSummary, ...] = (),
    ) -> None:
        with self._lock:
            if supersedes is not None:
                self._rows[supersedes].status = SessionStatus.SUPERSEDED
            self._rows[config.key] = _Row(
                config, SessionStatus.OPEN, created_ms, created_ms, len(inherited), window, list(inherited)
            )

    def set_status(self, key: SessionKey, status: SessionStatus, at_ms: int) -> None:
        with self._lock:
            self._rows[key].status = status
            self._rows[key].last_active_ms = at_ms

    def append_step(
        self, key: SessionKey, record: StepRecord, at_ms: int, filled: Optional[StepRecord] = None
    ) -> None:
        with self._lock:
            row = self._rows[key]
            if filled is not None:
                self._replace(row, key, filled)
            row.steps[record.step] = record
            row.order.append(record.step)
            row.step_count += 1
            row.last_step = record.step
            row.last_active_ms = at_ms

    def replace_step(self, key: SessionKey, record: StepRecord, at_ms: int) -> None:
        with self._lock:
            row = self._rows[key]
            self._replace(row, key, record)
            row.last_active_ms = at_ms

    @staticmethod
    def _replace(row: "_Row", key: SessionKey, record: StepRecord) -> None:
        if record.step not in row.steps:
            raise KeyError(f"step {record.step} of {key} is not recorded")
        row.steps[record.step] = record

    def close_epoch(
        self,
        key: SessionKey,
        closed: EpochSummary,
        next_epoch: int,
        next_window: tuple[Window, ...],
        at_ms: int,
        filled: Optional[StepRecord] = None,
    ) -> None:
        with self._lock:
            row = self._rows[key]
            if filled is not None:
                self._replace(row, key, filled)
            row.last_active_ms = at_ms
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

    def step_range(self, key: SessionKey, first: int, last: int, limit: int) -> list[StepRecord]:
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                return []
            i = bisect.bisect_left(row.order, first)
            j = min(bisect.bisect_right(row.order, last), i + limit)
            return [row.steps[s] for s in row.order[i:j]]

    def prune_steps(
        self, ended_before_ms: int, now_ms: int, max_rows: int, skip: frozenset[SessionKey] = frozenset()
    ) -> list[SessionKey]:
        pruned = []
        with self._lock:
            for key, row in self._rows.items():
                if max_rows <= 0:
                    break
                if (key in skip or row.status == SessionStatus.OPEN or row.pruned_ms
                        or row.last_active_ms >= ended_before_ms):
                    continue
                drop = row.order[:max_rows]
                for s in drop:
                    del row.steps[s]
                del row.order[: len(drop)]
                max_rows -= len(drop)
                if not row.order:
                    row.pruned_ms = now_ms
                    pruned.append(key)
        return pruned

    @staticmethod
    def _stored(row: _Row) -> StoredSession:
        return StoredSession(
            config=row.config,
            status=row.status,
            created_ms=row.created_ms,
            last_active_ms=row.last_active_ms,
            closed_epochs=tuple(row.epochs),
            open_epoch=row.open_epoch,
            open_window=row.open_window,
            open_steps=tuple(_of_epoch(row, row.open_epoch)),
            step_count=row.step_count,
            last_step=row.last_step,
            steps_pruned_ms=row.pruned_ms,
        )

    def closed_epochs(self, key: SessionKey, first: int, last: int) -> list[EpochSummary]:
        with self._lock:
            row = self._rows.get(key)
            return [] if row is None else row.epochs[max(first, 0) : last + 1]

    def epoch_steps(self, key: SessionKey, epoch: int) -> list[StepRecord]:
        with self._lock:
            return _of_epoch(self._rows[key], epoch)

    def load(self, open_only: bool = True) -> list[Union[StoredSession, Quarantined]]:
        with self._lock:
            return [
                self._stored(row)
                for row in self._rows.values()
                if not open_only or row.status == SessionStatus.OPEN
            ]

    def load_session(self, key: SessionKey) -> Optional[StoredSession]:
        with self._lock:
            row = self._rows.get(key)
            return None if row is None else self._stored(row)

    def latest_attempt(self, job_id: str) -> Optional[int]:
        with self._lock:
            return max((k.attempt for k in self._rows if k.job_id == job_id), default=None)

    def inactive_keys(self, limit: int) -> list[SessionKey]:
        with self._lock:
            rows = [r for r in self._rows.values() if r.status != SessionStatus.OPEN]
        rows.sort(key=lambda r: (r.created_ms, r.config.job_id, r.config.attempt), reverse=True)
        return [r.config.key for r in rows[:limit]]
