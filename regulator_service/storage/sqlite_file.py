"""The SQLite state file: its schema and migrations, and how it is opened, checked and connected.

A file from a newer server, a damaged file or an empty (0-byte) file is refused and never
rewritten; a new database only ever appears complete (built under a temporary name, then
renamed); connections never create a file (``mode=rw``), and ``check_file`` tells when the path
no longer is the file that was opened (removed or replaced while the server runs).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable, Optional

from .base import StoreError

log = logging.getLogger(__name__)

STATE_FILE = "regulator.sqlite3"
SCHEMA_VERSION = 2


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


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    """A Report is one INSERT: each step row carries its own time (``at_ms``), so the session row
    is no longer rewritten per step, and the index by epoch is gone (the open epoch's steps are
    the last ones in step order). Session rows gain the step count and last step of sessions
    whose steps were pruned (and the prune time), and a scratch table for health probes."""
    conn.execute("ALTER TABLE steps ADD COLUMN at_ms INTEGER NOT NULL DEFAULT 0")
    conn.execute("DROP INDEX steps_by_epoch")
    conn.execute("ALTER TABLE sessions ADD COLUMN step_count INTEGER NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE sessions ADD COLUMN last_step INTEGER NOT NULL DEFAULT -1")
    conn.execute("ALTER TABLE sessions ADD COLUMN steps_pruned_ms INTEGER NOT NULL DEFAULT 0")
    conn.execute("CREATE TABLE probe (x BLOB)")


# MIGRATIONS[v] upgrades a database at user_version v to v + 1 (0 = empty file).
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _create_v1, 1: _v1_to_v2}

class StateFile:
    """The state file at ``path``, opened (created or migrated) on construction."""

    def __init__(self, path: Path, timeout_s: float, max_bytes: Optional[int] = None) -> None:
        """``max_bytes``: fault injection, the file stops growing there as on a full disk."""
        self.path = path
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        if self.path.exists():
            self.inspect_read_only()
            self.migrate(self.path)
        else:
            self.create()
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def inspect_read_only(self) -> None:
        """Version and integrity checks through a read-only connection, so that a file we
        refuse is left byte for byte as we found it (a read-write close could checkpoint it).
        Without a ``-wal`` beside it (a clean shutdown folds it back) the file is opened
        ``immutable``: SQLite then makes no ``-wal``/``-shm`` files beside a file it refuses.
        With one (a killed server), that WAL is part of the state and is read with it."""
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise StoreError(f"cannot read state file {self.path}: {exc.strerror or exc}") from exc
        if size == 0:
            raise StoreError(
                f"state file {self.path} is empty (0 bytes): it is not a regulator database, and a new one "
                "is never made over an existing file (refusing to touch it; remove it to start afresh)"
            )
        try:
            sides = any(Path(f"{self.path}{side}").exists() for side in ("-wal", "-shm"))
            uri = f"{self.path.resolve().as_uri()}?mode=ro" + ("" if sides else "&immutable=1")
            conn = sqlite3.connect(uri, uri=True, timeout=10.0)
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

    def create(self) -> None:
        """A new database, built under a temporary name and renamed into place: a crash never
        leaves a half-made (or 0-byte) state file behind."""
        tmp = self.path.with_name(self.path.name + ".new")
        for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            stale.unlink(missing_ok=True)
        for side in ("-wal", "-shm"):  # left by a state file that was removed: never replay them
            orphan = Path(f"{self.path}{side}")
            if orphan.exists():
                aside = orphan.with_name(f"{orphan.name}.orphaned-{int(time.time())}")
                orphan.replace(aside)
                log.warning("the state file %s is missing but its %s file is not; moved that aside to %s", self.path, side, aside)
        self.migrate(tmp)
        os.replace(tmp, self.path)

    def migrate(self, path: Path) -> None:
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state file {path}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
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
        except sqlite3.Error as exc:
            raise StoreError(f"state file {path} is unusable: {exc}") from exc
        finally:
            conn.close()

    def open(self, timeout: float) -> sqlite3.Connection:
        """A connection to the existing state file (``mode=rw``: never creates one, so a removed
        file is not silently replaced by an empty database)."""
        uri = f"{self.path.resolve().as_uri()}?mode=rw"
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=timeout)

    def connect_writer(self) -> sqlite3.Connection:
        # a short busy timeout: while another process holds the write lock, the writer retries
        # and the callers' own deadlines decide (group_commit)
        conn = self.open(timeout=0.1)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
        if self.max_bytes is not None:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(1, self.max_bytes // page)}")
        return conn

    def connect_reader(self) -> sqlite3.Connection:
        conn = self.open(timeout=self.timeout_s)
        conn.execute("PRAGMA query_only=1")
        return conn

    def check_file(self) -> Optional[str]:
        """None while the path is still the file this store opened."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"the state file {self.path} was removed while the server was running"
        except OSError:
            return None  # cannot tell: the writes themselves will say
        if (st.st_dev, st.st_ino) != self._identity:
            return (
                f"the state file {self.path} was replaced while the server was running "
                f"(inode {self._identity[1]} is now {st.st_ino})"
            )
        return None
