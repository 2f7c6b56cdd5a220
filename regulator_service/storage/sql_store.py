"""The ``StateStore`` methods the two SQL stores run alike: a write is the statements
``statements`` builds, handed to the store's committer (``_write``); a read runs on a reader
connection (``_read``) and decodes with ``rows``. Each store keeps what really differs: how it
commits (PostgreSQL fences every session write with its guard), and the reads its SQL dialect
answers its own way."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar, Union

from ..model import EpochSummary, SessionConfig, SessionKey, SessionStatus, StepRecord
from ..policy import ProfileRegistry, Window
from .base import Quarantined, StateStore, StoredSession
from .rows import SessionRows
from .rows import step as decode_step
from .statements import Shape, Statement, Statements

T = TypeVar("T")


class SqlStore(StateStore):
    """``SQL``/``ROWS``: the store's statements and row decoding, for its paramstyle."""

    SQL: Statements
    ROWS: SessionRows
    profiles: ProfileRegistry

    def _write(self, key: SessionKey, statements: Sequence[Statement], shape: Optional[Shape] = None) -> None:
        """Commits one write of session ``key`` (``shape``: a hot op's constant shape)."""
        raise NotImplementedError

    def _write_fn(self, fn: Callable[[Any], None]) -> None:
        """Commits a write that is a function of the connection (pruning)."""
        raise NotImplementedError

    def _read(self, fn: Callable[[Any], T], bounded: bool = True) -> T:
        """Runs ``fn`` on a reader connection (``bounded``: within the store's timeout)."""
        raise NotImplementedError

    # -- writes -------------------------------------------------------------------------------

    def create_session(
        self,
        config: SessionConfig,
        created_ms: int,
        window: tuple[Window, ...],
        supersedes: Optional[SessionKey] = None,
        inherited: tuple[EpochSummary, ...] = (),
    ) -> None:
        statements = self.SQL.create_session(config, created_ms, window, supersedes, inherited)
        self._write(SessionKey(config.job_id, config.attempt), statements)

    def set_status(self, key: SessionKey, status: SessionStatus, at_ms: int) -> None:
        self._write(key, self.SQL.set_status(key, status, at_ms))

    def append_step(
        self, key: SessionKey, record: StepRecord, at_ms: int, filled: Optional[StepRecord] = None
    ) -> None:
        """One INSERT (see ``Statements.append_step``), batched with the other Reports'."""
        statements, shape = self.SQL.append_step(key, record, at_ms, filled)
        self._write(key, statements, shape)

    def replace_step(self, key: SessionKey, record: StepRecord, at_ms: int) -> None:
        self._write(key, self.SQL.replace_step(key, record, at_ms))

    def close_epoch(
        self,
        key: SessionKey,
        closed: EpochSummary,
        next_epoch: int,
        next_window: tuple[Window, ...],
        at_ms: int,
        filled: Optional[StepRecord] = None,
    ) -> None:
        self._write(key, self.SQL.close_epoch(key, closed, next_epoch, next_window, at_ms, filled))

    def prune_steps(
        self, ended_before_ms: int, now_ms: int, max_rows: int, skip: frozenset[SessionKey] = frozenset()
    ) -> list[SessionKey]:
        rows = self._read(lambda conn: conn.execute(self.SQL.prune_candidates, (ended_before_ms,)).fetchall())
        return self.SQL.prune(rows, now_ms, max_rows, skip, self._write_fn)

    # -- reads --------------------------------------------------------------------------------

    def get_step(self, key: SessionKey, step: int) -> Optional[StepRecord]:
        rows = self._read(lambda conn: conn.execute(self.SQL.one_step, (key.job_id, key.attempt, step)).fetchall())
        return decode_step(key, rows[0][0], step, rows[0][1]) if rows else None

    def iter_steps(self, key: SessionKey) -> Iterator[StepRecord]:
        return iter(self.step_range(key, 0, 2**63 - 1, 2**62))

    def epoch_steps(self, key: SessionKey, epoch: int) -> list[StepRecord]:
        return self._read(lambda conn: self.ROWS.epoch_steps(conn, key, epoch))

    def load(self, open_only: bool = True) -> list[Union[StoredSession, Quarantined]]:
        return self._read(lambda conn: self.ROWS.sessions(self.profiles, conn, open_only), bounded=False)

    def load_session(self, key: SessionKey) -> Optional[StoredSession]:
        return self._read(lambda conn: self.ROWS.load_session(self.profiles, conn, key))

    def closed_epochs(self, key: SessionKey, first: int, last: int) -> list[EpochSummary]:
        return self._read(lambda conn: self.ROWS.closed_epochs(conn, key, first, last))
