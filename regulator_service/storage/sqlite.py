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
from typing import Callable, Optional, Sequence, TypeVar

from ..model import SessionKey, StepRecord
from ..policy import BUILTIN_PROFILES, ProfileRegistry
from .group_commit import GroupCommitWriter, WriteOp
from .lockfile import StateDirLock
from .readers import ReadPool
from .rows import step as decode_step
from .sql_store import SqlStore
from .sqlite_file import STATE_FILE, StateFile
from .sqlite_rows import ROWS as SQLITE_ROWS
from .statements import SQLITE, Shape, Statement

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 2.0  # a store call that takes longer answers UNAVAILABLE
READERS = 4  # reads at once (history pages, sessions loaded on demand)
CHECKPOINT_INTERVAL_S = 1.0
_PROBE: tuple[Statement, ...] = (
    ("INSERT INTO probe VALUES (zeroblob(8192))", (), 1),
    ("DELETE FROM probe", (), None),
)


class SQLiteStore(SqlStore):
    SQL = SQLITE
    ROWS = SQLITE_ROWS

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

    # -- commits and reads (``SqlStore``) ------------------------------------------------------

    def _write(self, key: SessionKey, statements: Sequence[Statement], shape: Optional[Shape] = None) -> None:
        self._writer.submit(WriteOp(statements, shape=shape))

    def _write_fn(self, fn: Callable[[sqlite3.Connection], None]) -> None:
        self._writer.submit(WriteOp(fn=fn))

    def _read(self, fn: Callable[[sqlite3.Connection], T], bounded: bool = True) -> T:
        return self._readers.run(fn, bounded=bounded)

    # -- reads of its own (reader threads, bounded in time) -----------------------------------

    def step_range(self, key: SessionKey, first: int, last: int, limit: int) -> list[StepRecord]:
        def read(conn: sqlite3.Connection) -> list[StepRecord]:
            rows = conn.execute(SQLITE.step_range, (key.job_id, key.attempt, first, last, limit)).fetchall()
            out = []
            for i, (s, e, r) in enumerate(rows):
                out.append(decode_step(key, e, s, r))
                if i % 64 == 63:
                    time.sleep(0)  # a page of history is thousands of records: let Reports in between
            return out

        return self._readers.run(read)

    def latest_attempt(self, job_id: str) -> Optional[int]:
        return self._readers.run(lambda conn: conn.execute(SQLITE.latest_attempt, (job_id,)).fetchone()[0])

    def attempt_opened_by(self, job_id: str, open_token: str) -> Optional[int]:
        """One indexed query; a config that is not JSON (quarantined) is skipped, not an error."""
        return self._readers.run(
            lambda conn: conn.execute(
                "SELECT MIN(attempt) FROM sessions WHERE job_id=? AND "
                "(CASE WHEN json_valid(config) THEN json_extract(config, '$.open_token') END)=?",
                (job_id, open_token),
            ).fetchone()[0]
        )

    def inactive_keys(self, limit: int) -> list[SessionKey]:
        rows = self._readers.run(lambda conn: conn.execute(SQLITE.inactive_keys, (limit,)).fetchall())
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

