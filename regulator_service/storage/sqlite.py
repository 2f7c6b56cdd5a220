"""The embedded default store: one SQLite file in WAL mode under ``--state-dir``.

Every durable point is its own transaction, committed before the answer leaves the server. With
``synchronous=NORMAL`` a commit survives a killed process (it is in the OS's WAL pages); only a
power loss can drop the last commits, and those are answers the client re-requests
idempotently. The schema is versioned with ``PRAGMA user_version`` and migrated forward step by
step; a file from a newer server or a damaged file is refused, never rewritten.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..model import EpochSummary, SessionConfig, SessionKey, SessionStatus, StepRecord
from ..policy import BUILTIN_PROFILES, ProfileRegistry, Window
from . import codec
from .base import StateStore, StoredSession, StoreError

STATE_FILE = "regulator.sqlite3"
SCHEMA_VERSION = 1


def _create_v1(conn: sqlite3.Connection) -> None:
    # one statement per execute(): executescript() would commit the migration's transaction
    for statement in """
        CREATE TABLE sessions (
            job_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            config TEXT NOT NULL,
            status INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            last_active_ms INTEGER NOT NULL,
            open_epoch INTEGER NOT NULL,
            open_window TEXT NOT NULL,
            PRIMARY KEY (job_id, attempt)
        );
        CREATE INDEX sessions_by_status ON sessions (status, created_ms);
        CREATE TABLE epochs (
            job_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            epoch INTEGER NOT NULL,
            summary TEXT NOT NULL,
            PRIMARY KEY (job_id, attempt, epoch)
        ) WITHOUT ROWID;
        CREATE TABLE steps (
            job_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            step INTEGER NOT NULL,
            epoch INTEGER NOT NULL,
            record TEXT NOT NULL,
            PRIMARY KEY (job_id, attempt, step)
        ) WITHOUT ROWID;
        CREATE INDEX steps_by_epoch ON steps (job_id, attempt, epoch);
        """.split(";"):
        if statement.strip():
            conn.execute(statement)


# MIGRATIONS[v] upgrades a database at user_version v to v + 1 (0 = empty file).
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _create_v1}


class SQLiteStore(StateStore):
    def __init__(self, state_dir: str | os.PathLike[str], profiles: ProfileRegistry = BUILTIN_PROFILES) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self.profiles = profiles  # decodes the stored profiles (built-ins plus the server's plugins)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create state directory {self.path.parent}: {exc}") from exc
        if self.path.exists():
            self._inspect_read_only()
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state file {self.path}: {exc}") from exc
        try:
            self._migrate()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"state file {self.path} is unusable: {exc}") from exc

    def _inspect_read_only(self) -> None:
        """Version and integrity checks through a read-only connection, so that a file we
        refuse is left byte for byte as we found it (a read-write close could checkpoint it)."""
        try:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state file {self.path}: {exc}") from exc
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"state file {self.path} has schema version {version}; this server knows "
                    f"versions up to {SCHEMA_VERSION} (refusing to touch it)"
                )
            if version > 0:
                result = conn.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise StoreError(f"state file {self.path} is corrupt: {result}")
        except sqlite3.Error as exc:
            raise StoreError(f"state file {self.path} is unreadable: {exc}") from exc
        finally:
            conn.close()

    def _migrate(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        while version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                MIGRATIONS[version](conn)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _write(self, fn: Callable[[sqlite3.Connection], None]) -> None:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    fn(self._conn)
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"state write failed: {exc}") from exc

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"state read failed: {exc}") from exc

    # -- writes -----------------------------------------------------------------------------

    def create_session(
        self,
        config: SessionConfig,
        created_ms: int,
        window: tuple[Window, ...],
        supersedes: Optional[SessionKey] = None,
        inherited: tuple[EpochSummary, ...] = (),
    ) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            if supersedes is not None:
                conn.execute(
                    "UPDATE sessions SET status=? WHERE job_id=? AND attempt=?",
                    (int(SessionStatus.SUPERSEDED), supersedes.job_id, supersedes.attempt),
                )
            conn.execute(
                "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?)",
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
            )
            conn.executemany(
                "INSERT INTO epochs VALUES (?,?,?,?)",
                [(config.job_id, config.attempt, e.epoch, codec.epoch_to_json(e)) for e in inherited],
            )

        self._write(tx)

    def set_status(self, key: SessionKey, status: SessionStatus, at_ms: int) -> None:
        self._write(
            lambda conn: conn.execute(
                "UPDATE sessions SET status=?, last_active_ms=? WHERE job_id=? AND attempt=?",
                (int(status), at_ms, key.job_id, key.attempt),
            )
        )

    def append_step(self, key: SessionKey, record: StepRecord, at_ms: int) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO steps VALUES (?,?,?,?,?)",
                (key.job_id, key.attempt, record.step, record.epoch, codec.step_to_json(record)),
            )
            conn.execute(
                "UPDATE sessions SET last_active_ms=? WHERE job_id=? AND attempt=?",
                (at_ms, key.job_id, key.attempt),
            )

        self._write(tx)

    def replace_step(self, key: SessionKey, record: StepRecord, at_ms: int) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE steps SET epoch=?, record=? WHERE job_id=? AND attempt=? AND step=?",
                (record.epoch, codec.step_to_json(record), key.job_id, key.attempt, record.step),
            )
            if cur.rowcount != 1:
                raise sqlite3.IntegrityError(f"step {record.step} of {key} is not recorded")
            conn.execute(
                "UPDATE sessions SET last_active_ms=? WHERE job_id=? AND attempt=?",
                (at_ms, key.job_id, key.attempt),
            )

        self._write(tx)

    def close_epoch(
        self,
        key: SessionKey,
        closed: EpochSummary,
        next_epoch: int,
        next_window: tuple[Window, ...],
        at_ms: int,
    ) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO epochs VALUES (?,?,?,?)",
                (key.job_id, key.attempt, closed.epoch, codec.epoch_to_json(closed)),
            )
            conn.execute(
                "UPDATE sessions SET open_epoch=?, open_window=?, last_active_ms=? "
                "WHERE job_id=? AND attempt=?",
                (next_epoch, codec.windows_to_json(next_window), at_ms, key.job_id, key.attempt),
            )

        self._write(tx)

    # -- reads ------------------------------------------------------------------------------

    def get_step(self, key: SessionKey, step: int) -> Optional[StepRecord]:
        rows = self._read(
            "SELECT epoch, record FROM steps WHERE job_id=? AND attempt=? AND step=?",
            (key.job_id, key.attempt, step),
        )
        return codec.step_from_json(rows[0][0], step, rows[0][1]) if rows else None

    def iter_steps(self, key: SessionKey) -> Iterator[StepRecord]:
        rows = self._read(
            "SELECT step, epoch, record FROM steps WHERE job_id=? AND attempt=? ORDER BY step",
            (key.job_id, key.attempt),
        )
        return (codec.step_from_json(e, s, r) for s, e, r in rows)

    def epoch_steps(self, key: SessionKey, epoch: int) -> list[StepRecord]:
        rows = self._read(
            "SELECT step, record FROM steps WHERE job_id=? AND attempt=? AND epoch=? ORDER BY step",
            (key.job_id, key.attempt, epoch),
        )
        return [codec.step_from_json(epoch, s, r) for s, r in rows]

    def _stored(self, row: tuple) -> StoredSession:
        job_id, attempt, config, status, created_ms, last_active_ms, open_epoch, open_window = row
        args = (job_id, attempt)
        epochs = tuple(
            codec.epoch_from_json(summary)
            for (summary,) in self._read(
                "SELECT summary FROM epochs WHERE job_id=? AND attempt=? ORDER BY epoch", args
            )
        )
        open_steps = tuple(self.epoch_steps(SessionKey(job_id, attempt), open_epoch))
        count, last = self._read(
            "SELECT COUNT(*), COALESCE(MAX(step), -1) FROM steps WHERE job_id=? AND attempt=?", args
        )[0]
        return StoredSession(
            config=codec.config_from_json(config, self.profiles),
            status=SessionStatus(status),
            created_ms=created_ms,
            last_active_ms=last_active_ms,
            closed_epochs=epochs,
            open_epoch=open_epoch,
            open_window=codec.windows_from_json(open_window),
            open_steps=open_steps,
            step_count=count,
            last_step=last,
        )

    _SESSION_COLUMNS = "job_id, attempt, config, status, created_ms, last_active_ms, open_epoch, open_window"

    def load(self, open_only: bool = True) -> list[StoredSession]:
        where = f"WHERE status={int(SessionStatus.OPEN)}" if open_only else ""
        rows = self._read(f"SELECT {self._SESSION_COLUMNS} FROM sessions {where} ORDER BY created_ms, job_id, attempt")
        try:
            return [self._stored(row) for row in rows]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"state file {self.path} holds an undecodable record: {exc}") from exc

    def load_session(self, key: SessionKey) -> Optional[StoredSession]:
        rows = self._read(
            f"SELECT {self._SESSION_COLUMNS} FROM sessions WHERE job_id=? AND attempt=?", (key.job_id, key.attempt)
        )
        try:
            return self._stored(rows[0]) if rows else None
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"state file {self.path} holds an undecodable record: {exc}") from exc

    def latest_attempt(self, job_id: str) -> Optional[int]:
        return self._read("SELECT MAX(attempt) FROM sessions WHERE job_id=?", (job_id,))[0][0]

    def inactive_keys(self, limit: int) -> list[SessionKey]:
        rows = self._read(
            "SELECT job_id, attempt FROM sessions WHERE status<>? "
            "ORDER BY created_ms DESC, job_id DESC, attempt DESC LIMIT ?",
            (int(SessionStatus.OPEN), limit),
        )
        return [SessionKey(job, attempt) for job, attempt in rows]

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._conn.close()
