"""The SQL both SQL stores run, written once: SQLite and PostgreSQL hold the same rows and
differ only in the placeholder (``?`` or ``%s``) and one function name, so every session write
(and the reads that decode a session) is built here for a paramstyle, and the two stores cannot
drift apart."""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..model import EpochSummary, SessionConfig, SessionKey, SessionStatus, StepRecord
from ..policy import Window
from . import codec

Statement = tuple[str, tuple, Optional[int]]  # SQL, parameters, expected rowcount (None: any)
Shape = tuple[tuple[str, bool], ...]  # what ops of the same statements share (group commit batches them)

SESSION_COLUMNS = (
    "job_id, attempt, config, status, created_ms, last_active_ms, open_epoch, open_window, "
    "step_count, last_step, steps_pruned_ms"
)
STEP_COLUMNS = "job_id, attempt, step, epoch, record, at_ms"
ENDED = (int(SessionStatus.CLOSED), int(SessionStatus.SUPERSEDED), int(SessionStatus.EXPIRED))


class Statements:
    """The statements of one paramstyle, built once (the hot ops' shapes are constants, so
    group commit batches equal ops without comparing their SQL each time)."""

    def __init__(self, placeholder: str, greatest: str) -> None:
        """``greatest``: the larger of two values (``MAX`` in SQLite, ``GREATEST`` in PostgreSQL)."""
        q: Callable[[str], str] = lambda text: text.replace("?", placeholder)  # no statement holds a literal ? or %
        self.insert_step_sql = q(f"INSERT INTO steps ({STEP_COLUMNS}) VALUES (?,?,?,?,?,?)")
        self.update_step_sql = q("UPDATE steps SET epoch=?, record=?, at_ms=? WHERE job_id=? AND attempt=? AND step=?")
        self.append_shape: Shape = ((self.insert_step_sql, True),)
        self.append_filled_shape: Shape = ((self.update_step_sql, True), (self.insert_step_sql, True))
        self._supersede = q("UPDATE sessions SET status=? WHERE job_id=? AND attempt=?")
        self._insert_session = q(f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,0,-1,0)")
        self._insert_epoch = q("INSERT INTO epochs VALUES (?,?,?,?)")
        self._set_status = q("UPDATE sessions SET status=?, last_active_ms=? WHERE job_id=? AND attempt=?")
        self._touch = q("UPDATE sessions SET last_active_ms=? WHERE job_id=? AND attempt=?")
        self._next_epoch = q(
            "UPDATE sessions SET open_epoch=?, open_window=?, last_active_ms=? WHERE job_id=? AND attempt=?"
        )
        self.prune_candidates = q(
            f"SELECT job_id, attempt FROM sessions WHERE status IN {ENDED} AND last_active_ms < ? "
            "AND steps_pruned_ms <= 0 ORDER BY last_active_ms LIMIT 64"
        )
        self._prune_keep = q(
            "UPDATE sessions SET steps_pruned_ms=-1, "
            "step_count=(SELECT COUNT(*) FROM steps WHERE job_id=? AND attempt=?), "
            "last_step=(SELECT COALESCE(MAX(step), -1) FROM steps WHERE job_id=? AND attempt=?), "
            f"last_active_ms={greatest}(last_active_ms, COALESCE((SELECT at_ms FROM steps WHERE job_id=? "
            "AND attempt=? ORDER BY step DESC LIMIT 1), 0)) "
            "WHERE job_id=? AND attempt=? AND steps_pruned_ms=0"
        )
        self._prune_delete = q(
            "DELETE FROM steps WHERE job_id=? AND attempt=? AND step IN "
            "(SELECT step FROM steps WHERE job_id=? AND attempt=? ORDER BY step LIMIT ?)"
        )
        self._steps_left = q("SELECT EXISTS (SELECT 1 FROM steps WHERE job_id=? AND attempt=?)")
        self._pruned = q("UPDATE sessions SET steps_pruned_ms=? WHERE job_id=? AND attempt=?")
        # the reads (those that decode a session: ``rows``)
        self.one_step = q("SELECT epoch, record FROM steps WHERE job_id=? AND attempt=? AND step=?")
        self.step_range = q(
            "SELECT step, epoch, record FROM steps WHERE job_id=? AND attempt=? AND step BETWEEN ? AND ? "
            "ORDER BY step LIMIT ?"
        )
        self.latest_attempt = q("SELECT MAX(attempt) FROM sessions WHERE job_id=?")
        self.inactive_keys = q(
            f"SELECT job_id, attempt FROM sessions WHERE status<>{int(SessionStatus.OPEN)} "
            "ORDER BY created_ms DESC, job_id DESC, attempt DESC LIMIT ?"
        )
        self.sessions = f"SELECT {SESSION_COLUMNS} FROM sessions"
        self.one_session = q(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE job_id=? AND attempt=?")
        self.session_epochs = q("SELECT epoch, summary FROM epochs WHERE job_id=? AND attempt=? ORDER BY epoch")
        self.epoch_range = q(
            "SELECT epoch, summary FROM epochs WHERE job_id=? AND attempt=? AND epoch BETWEEN ? AND ? ORDER BY epoch"
        )
        self.step_count = q("SELECT COUNT(*), COALESCE(MAX(step), -1) FROM steps WHERE job_id=? AND attempt=?")
        self.newest_step_at = q("SELECT at_ms FROM steps WHERE job_id=? AND attempt=? ORDER BY step DESC LIMIT 1")

    # -- session writes (each a list of statements, run in one transaction) -------------------

    def create_session(
        self,
        config: SessionConfig,
        created_ms: int,
        window: tuple[Window, ...],
        supersedes: Optional[SessionKey],
        inherited: tuple[EpochSummary, ...],
    ) -> list[Statement]:
        statements: list[Statement] = []
        if supersedes is not None:
            statements.append(
                (self._supersede, (int(SessionStatus.SUPERSEDED), supersedes.job_id, supersedes.attempt), 1)
            )
        statements.append((
            self._insert_session,
            (
                config.job_id, config.attempt, codec.config_to_json(config), int(SessionStatus.OPEN),
                created_ms, created_ms, len(inherited), codec.windows_to_json(window),
            ),
            1,
        ))
        for e in inherited:
            statements.append((self._insert_epoch, (config.job_id, config.attempt, e.epoch, codec.epoch_to_json(e)), 1))
        return statements

    def set_status(self, key: SessionKey, status: SessionStatus, at_ms: int) -> list[Statement]:
        return [(self._set_status, (int(status), at_ms, key.job_id, key.attempt), 1)]

    def update_step(self, key: SessionKey, record: StepRecord, at_ms: int) -> Statement:
        """Overwrites a recorded step (an amendment, or a step whose deferred Fisher arrived)."""
        params = (record.epoch, codec.step_to_json(record), at_ms, key.job_id, key.attempt, record.step)
        return (self.update_step_sql, params, 1)

    def append_step(
        self, key: SessionKey, record: StepRecord, at_ms: int, filled: Optional[StepRecord]
    ) -> tuple[tuple[Statement, ...], Shape]:
        """One INSERT (the session row is not touched: the step row's ``at_ms`` is the session's
        last activity), after the UPDATE of ``filled``; with its constant shape."""
        params = (key.job_id, key.attempt, record.step, record.epoch, codec.step_to_json(record), at_ms)
        insert: Statement = (self.insert_step_sql, params, 1)
        if filled is None:
            return (insert,), self.append_shape
        return (self.update_step(key, filled, at_ms), insert), self.append_filled_shape

    def replace_step(self, key: SessionKey, record: StepRecord, at_ms: int) -> list[Statement]:
        return [self.update_step(key, record, at_ms), (self._touch, (at_ms, key.job_id, key.attempt), 1)]

    def close_epoch(
        self,
        key: SessionKey,
        closed: EpochSummary,
        next_epoch: int,
        next_window: tuple[Window, ...],
        at_ms: int,
        filled: Optional[StepRecord],
    ) -> list[Statement]:
        statements: list[Statement] = [] if filled is None else [self.update_step(key, filled, at_ms)]
        statements.append((self._insert_epoch, (key.job_id, key.attempt, closed.epoch, codec.epoch_to_json(closed)), 1))
        statements.append((
            self._next_epoch,
            (next_epoch, codec.windows_to_json(next_window), at_ms, key.job_id, key.attempt),
            1,
        ))
        return statements

    # -- pruning ------------------------------------------------------------------------------

    def prune(
        self,
        candidates: list[tuple[Any, Any]],
        now_ms: int,
        max_rows: int,
        skip: frozenset[SessionKey],
        submit: Callable[[Callable[[Any], None]], None],
    ) -> list[SessionKey]:
        """Deletes the steps of ended sessions (``candidates``: rows of ``prune_candidates``),
        at most ``max_rows`` in all, one chunk per session as a write of its own (``submit``);
        the sessions whose steps are all gone."""
        pruned: list[SessionKey] = []
        budget = max_rows
        for job_id, attempt in candidates:
            key = SessionKey(job_id, attempt)
            if key in skip or budget <= 0:
                continue
            done: list[int] = [0, 0]

            def chunk(conn: Any, key: SessionKey = key, n: int = budget, done: list[int] = done) -> None:
                done[:] = self._prune_chunk(conn, key, n, now_ms)

            submit(chunk)
            budget -= done[0]
            if done[1]:
                pruned.append(key)
        return pruned

    def _prune_chunk(self, conn: Any, key: SessionKey, n: int, now_ms: int) -> list[int]:
        """[rows deleted, 1 if none is left]: the first chunk keeps what the session row cannot
        learn from its steps any more."""
        args = (key.job_id, key.attempt)
        conn.execute(self._prune_keep, (*args, *args, *args, *args))
        deleted = conn.execute(self._prune_delete, (*args, *args, n)).rowcount
        row = conn.execute(self._steps_left, args).fetchone()
        left = bool(row and row[0])
        if not left:
            conn.execute(self._pruned, (now_ms, *args))
        return [deleted, 0 if left else 1]


SQLITE = Statements("?", "MAX")
POSTGRESQL = Statements("%s", "GREATEST")
