"""The embedded default store: one SQLite file in WAL mode under ``--state-dir``.

Every durable point is committed before the answer leaves the server; concurrent requests share
one commit (``group_commit``). With ``synchronous=NORMAL`` a commit survives a killed process
(it is in the OS's WAL pages); only a power loss can drop the last commits, and those are answers
the client re-requests idempotently. Reads run on their own connections (``readers``), so a
history read never waits for a write nor a write for a read; the WAL is checkpointed by a
background thread, off the commit path.

The state directory is locked for the server's lifetime (``lockfile``). The schema is versioned
with ``PRAGMA user_version`` and migrated forward step by step; a file from a newer server, a
damaged file or an empty (0-byte) file is refused and never rewritten, and a new database only
ever appears complete (built under a temporary name, then renamed). If the state file is removed
or replaced while the server runs, every later write is refused. Records are decoded session by
session: a session whose records do not decode is reported (``Quarantined``, ``CorruptRecord``)
and the others load.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from ..model import EpochSummary, SessionConfig, SessionKey, SessionStatus, StepRecord
from ..policy import BUILTIN_PROFILES, ProfileRegistry, Window
from . import codec, sqlite_rows
from .base import CorruptRecord, Quarantined, StateStore, StoredSession
from .group_commit import GroupCommitWriter, Statement, WriteOp
from .lockfile import StateDirLock
from .readers import ReadPool
from .sqlite_file import STATE_FILE, StateFile

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0  # a store call that takes longer answers UNAVAILABLE
READERS = 4  # reads at once (history pages, sessions loaded on demand)
CHECKPOINT_INTERVAL_S = 1.0
_ENDED = (int(SessionStatus.CLOSED), int(SessionStatus.SUPERSEDED), int(SessionStatus.EXPIRED))


_SESSION_COLUMNS = (
    "job_id, attempt, config, status, created_ms, last_active_ms, open_epoch, open_window, "
    "step_count, last_step, steps_pruned_ms"
)
_STEP_COLUMNS = "job_id, attempt, step, epoch, record, at_ms"
_UPDATE_STEP = "UPDATE steps SET epoch=?, record=?, at_ms=? WHERE job_id=? AND attempt=? AND step=?"
_INSERT_STEP = f"INSERT INTO steps ({_STEP_COLUMNS}) VALUES (?,?,?,?,?,?)"
_APPEND = ((_INSERT_STEP, True),)  # the shapes of the hot ops (group_commit batches equal shapes)
_APPEND_FILLED = ((_UPDATE_STEP, True), (_INSERT_STEP, True))
_PROBE: tuple[Statement, ...] = (
    ("INSERT INTO probe VALUES (zeroblob(8192))", (), 1),
    ("DELETE FROM probe", (), None),
)


def _update_step(key: SessionKey, record: StepRecord, at_ms: int) -> Statement:
    """Overwrites a recorded step (an amendment, or a step whose deferred Fisher arrived)."""
    return (_UPDATE_STEP, (record.epoch, codec.step_to_json(record), at_ms, key.job_id, key.attempt, record.step), 1)


class SQLiteStore(StateStore):
    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        profiles: ProfileRegistry = BUILTIN_PROFILES,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        readers: int = READERS,
        lock: Optional[StateDirLock] = None,
        max_bytes: Optional[int] = None,
    ) -> None:
        """``lock``: the state directory's lock if the caller holds it already (else taken
        here, ``StateDirLocked`` if another server has it). ``max_bytes``: fault injection, the
        file stops growing there as on a full disk (``serve --debug-max-state-bytes``)."""
        self.path = Path(state_dir) / STATE_FILE
        self.profiles = profiles  # decodes the stored profiles (built-ins plus the server's plugins)
        self.timeout_s = timeout_s
        self._own_lock = lock is None
        self._dir_lock = lock if lock is not None else StateDirLock.acquire(Path(state_dir))
        self._stop = threading.Event()
        try:
            self._file = StateFile(self.path, timeout_s, max_bytes)
            self._writer = GroupCommitWriter(self._file.connect_writer, self._file.check_file, self.path, timeout_s)
        except BaseException:
            if self._own_lock:
                self._dir_lock.release()
            raise
        self._readers = ReadPool(self._file.connect_reader, readers, timeout_s)
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="regulator-store-checkpoint", daemon=True)
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """Copies the WAL back into the database off the commit path (PASSIVE: never blocks
        the writer or readers)."""
        conn: Optional[sqlite3.Connection] = None
        while not self._stop.wait(CHECKPOINT_INTERVAL_S):
            try:
                if conn is None:
                    conn = self._file.open(timeout=0.1)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                log.debug("checkpoint skipped: %s", exc)
        if conn is not None:
            conn.close()

    # -- writes -------------------------------------------------------------------------------

    def _submit(self, statements: Sequence[Statement] = (), fn: Optional[Callable[[sqlite3.Connection], None]] = None) -> None:
        self._writer.submit(WriteOp(statements, fn))

    def create_session(
        self,
        config: SessionConfig,
        created_ms: int,
        window: tuple[Window, ...],
        supersedes: Optional[SessionKey] = None,
        inherited: tuple[EpochSummary, ...] = (),
    ) -> None:
        statements: list[Statement] = []
        if supersedes is not None:
            statements.append((
                "UPDATE sessions SET status=? WHERE job_id=? AND attempt=?",
                (int(SessionStatus.SUPERSEDED), supersedes.job_id, supersedes.attempt),
                1,
            ))
        statements.append((
            f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,0,-1,0)",
            (
                config.job_id,
                config.attempt,
                codec.config_to_json(config),
                int(SessionStatus.OPEN),
                created_ms,
                created_ms,
                len(inherited),
                codec.windows_to_json(window),
            ),
            1,
        ))
        for e in inherited:
            statements.append((
                "INSERT INTO epochs VALUES (?,?,?,?)",
                (config.job_id, config.attempt, e.epoch, codec.epoch_to_json(e)),
                1,
            ))
        self._submit(statements)

    def set_status(self, key: SessionKey, status: SessionStatus, at_ms: int) -> None:
        self._submit([(
            "UPDATE sessions SET status=?, last_active_ms=? WHERE job_id=? AND attempt=?",
            (int(status), at_ms, key.job_id, key.attempt),
            1,
        )])

    def append_step(
        self, key: SessionKey, record: StepRecord, at_ms: int, filled: Optional[StepRecord] = None
    ) -> None:
        """One INSERT (the session row is not touched: the step row's ``at_ms`` is the session's
        last activity, see ``_session``)."""
        insert: Statement = (_INSERT_STEP, (key.job_id, key.attempt, record.step, record.epoch, codec.step_to_json(record), at_ms), 1)
        if filled is None:
            self._writer.submit(WriteOp((insert,), shape=_APPEND))
        else:
            self._writer.submit(WriteOp((_update_step(key, filled, at_ms), insert), shape=_APPEND_FILLED))

    def replace_step(self, key: SessionKey, record: StepRecord, at_ms: int) -> None:
        self._submit([
            _update_step(key, record, at_ms),
            ("UPDATE sessions SET last_active_ms=? WHERE job_id=? AND attempt=?", (at_ms, key.job_id, key.attempt), 1),
        ])

    def close_epoch(
        self,
        key: SessionKey,
        closed: EpochSummary,
        next_epoch: int,
        next_window: tuple[Window, ...],
        at_ms: int,
        filled: Optional[StepRecord] = None,
    ) -> None:
        statements: list[Statement] = [] if filled is None else [_update_step(key, filled, at_ms)]
        statements.append((
            "INSERT INTO epochs VALUES (?,?,?,?)",
            (key.job_id, key.attempt, closed.epoch, codec.epoch_to_json(closed)),
            1,
        ))
        statements.append((
            "UPDATE sessions SET open_epoch=?, open_window=?, last_active_ms=? WHERE job_id=? AND attempt=?",
            (next_epoch, codec.windows_to_json(next_window), at_ms, key.job_id, key.attempt),
            1,
        ))
        self._submit(statements)

    def prune_steps(
        self, ended_before_ms: int, now_ms: int, max_rows: int, skip: frozenset[SessionKey] = frozenset()
    ) -> list[SessionKey]:
        rows = self._readers.run(
            lambda conn: conn.execute(
                f"SELECT job_id, attempt FROM sessions WHERE status IN {_ENDED} AND last_active_ms < ? "
                "AND steps_pruned_ms <= 0 ORDER BY last_active_ms LIMIT 64",
                (ended_before_ms,),
            ).fetchall()
        )
        pruned: list[SessionKey] = []
        budget = max_rows
        for job_id, attempt in rows:
            key = SessionKey(job_id, attempt)
            if key in skip or budget <= 0:
                continue
            done: list[int] = []

            def chunk(conn: sqlite3.Connection, key: SessionKey = key, n: int = budget, done: list[int] = done) -> None:
                args = (key.job_id, key.attempt)
                # first chunk: keep what the session row cannot learn from its steps any more
                conn.execute(
                    "UPDATE sessions SET steps_pruned_ms=-1, "
                    "step_count=(SELECT COUNT(*) FROM steps WHERE job_id=? AND attempt=?), "
                    "last_step=(SELECT COALESCE(MAX(step), -1) FROM steps WHERE job_id=? AND attempt=?), "
                    "last_active_ms=MAX(last_active_ms, COALESCE((SELECT at_ms FROM steps WHERE job_id=? AND attempt=? "
                    "ORDER BY step DESC LIMIT 1), 0)) "
                    "WHERE job_id=? AND attempt=? AND steps_pruned_ms=0",
                    (*args, *args, *args, *args),
                )
                deleted = conn.execute(
                    "DELETE FROM steps WHERE job_id=? AND attempt=? AND step IN "
                    "(SELECT step FROM steps WHERE job_id=? AND attempt=? ORDER BY step LIMIT ?)",
                    (*args, *args, n),
                ).rowcount
                left = conn.execute("SELECT EXISTS (SELECT 1 FROM steps WHERE job_id=? AND attempt=?)", args).fetchone()[0]
                if not left:
                    conn.execute(
                        "UPDATE sessions SET steps_pruned_ms=? WHERE job_id=? AND attempt=?", (now_ms, *args)
                    )
                done[:] = [deleted, 0 if left else 1]

            self._submit(fn=chunk)
            budget -= done[0]
            if done[1]:
                pruned.append(key)
        return pruned

    # -- reads (reader threads, bounded in time) ----------------------------------------------

    def get_step(self, key: SessionKey, step: int) -> Optional[StepRecord]:
        rows = self._readers.run(
            lambda conn: conn.execute(
                "SELECT epoch, record FROM steps WHERE job_id=? AND attempt=? AND step=?",
                (key.job_id, key.attempt, step),
            ).fetchall()
        )
        return sqlite_rows.step(key, rows[0][0], step, rows[0][1]) if rows else None

    def step_range(self, key: SessionKey, first: int, last: int, limit: int) -> list[StepRecord]:
        def read(conn: sqlite3.Connection) -> list[StepRecord]:
            rows = conn.execute(
                "SELECT step, epoch, record FROM steps WHERE job_id=? AND attempt=? AND step BETWEEN ? AND ? "
                "ORDER BY step LIMIT ?",
                (key.job_id, key.attempt, first, last, limit),
            ).fetchall()
            out = []
            for i, (s, e, r) in enumerate(rows):
                out.append(sqlite_rows.step(key, e, s, r))
                if i % 64 == 63:
                    time.sleep(0)  # a page of history is thousands of records: let Reports in between
            return out

        return self._readers.run(read)

    def iter_steps(self, key: SessionKey) -> Iterator[StepRecord]:
        return iter(self.step_range(key, 0, 2**63 - 1, 2**62))

    def epoch_steps(self, key: SessionKey, epoch: int) -> list[StepRecord]:
        return self._readers.run(lambda conn: sqlite_rows.epoch_steps(conn, key, epoch))

    def load(self, open_only: bool = True) -> list[Union[StoredSession, Quarantined]]:
        where = f"WHERE status={int(SessionStatus.OPEN)}" if open_only else ""

        def read(conn: sqlite3.Connection) -> list[Union[StoredSession, Quarantined]]:
            out: list[Union[StoredSession, Quarantined]] = []
            rows = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions {where} ORDER BY created_ms, job_id, attempt").fetchall()
            for row in rows:
                try:
                    out.append(sqlite_rows.session(self.profiles, conn, row))
                except CorruptRecord as exc:
                    log.error("quarantined session %s: %s", exc.key, exc.reason)
                    out.append(Quarantined(exc.key, exc.reason, _int(row[4]), _int(row[5])))
            return out

        return self._readers.run(read, bounded=False)

    def load_session(self, key: SessionKey) -> Optional[StoredSession]:
        def read(conn: sqlite3.Connection) -> Optional[StoredSession]:
            rows = conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE job_id=? AND attempt=?", (key.job_id, key.attempt)
            ).fetchall()
            return sqlite_rows.session(self.profiles, conn, rows[0]) if rows else None

        return self._readers.run(read)

    def latest_attempt(self, job_id: str) -> Optional[int]:
        return self._readers.run(
            lambda conn: conn.execute("SELECT MAX(attempt) FROM sessions WHERE job_id=?", (job_id,)).fetchone()[0]
        )

    def inactive_keys(self, limit: int) -> list[SessionKey]:
        rows = self._readers.run(
            lambda conn: conn.execute(
                "SELECT job_id, attempt FROM sessions WHERE status<>? "
                "ORDER BY created_ms DESC, job_id DESC, attempt DESC LIMIT ?",
                (int(SessionStatus.OPEN), limit),
            ).fetchall()
        )
        return [SessionKey(job, attempt) for job, attempt in rows]

    # -- health -------------------------------------------------------------------------------

    def health(self) -> Optional[str]:
        return self._writer.health()

    def probe(self) -> Optional[str]:
        return self._writer.probe(_PROBE)

    def close(self) -> None:
        self._stop.set()
        # fold the WAL back into the file, so that the state is one file at rest
        self._writer.close(finalize=lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        self._readers.close()
        self._checkpointer.join(timeout=2.0)
        if self._own_lock:
            self._dir_lock.release()


def _int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0

