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
from . import codec
from .base import CorruptRecord, Quarantined, StateStore, StoredSession, StoreError
from .group_commit import GroupCommitWriter, Statement, WriteOp
from .lockfile import StateDirLock
from .readers import ReadPool

log = logging.getLogger(__name__)

STATE_FILE = "regulator.sqlite3"
SCHEMA_VERSION = 2
DEFAULT_TIMEOUT_S = 2.0  # a store call that takes longer answers UNAVAILABLE
READERS = 4  # reads at once (history pages, sessions loaded on demand)
CHECKPOINT_INTERVAL_S = 1.0
_ENDED = (int(SessionStatus.CLOSED), int(SessionStatus.SUPERSEDED), int(SessionStatus.EXPIRED))
_DECODE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError)


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


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


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
        self._max_bytes = max_bytes
        self._own_lock = lock is None
        self._dir_lock = lock if lock is not None else StateDirLock.acquire(Path(state_dir))
        self._stop = threading.Event()
        try:
            if self.path.exists():
                self._inspect_read_only()
                self._migrate(self.path)
            else:
                self._create()
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            self._writer = GroupCommitWriter(self._connect_writer, self._check_file, self.path, timeout_s)
        except BaseException:
            if self._own_lock:
                self._dir_lock.release()
            raise
        self._readers = ReadPool(self._connect_reader, readers, timeout_s)
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="regulator-store-checkpoint", daemon=True)
        self._checkpointer.start()

    # -- opening ------------------------------------------------------------------------------

    def _inspect_read_only(self) -> None:
        """Version and integrity checks through a read-only connection, so that a file we
        refuse is left byte for byte as we found it (a read-write close could checkpoint it)."""
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

    def _create(self) -> None:
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
        self._migrate(tmp)
        os.replace(tmp, self.path)

    def _migrate(self, path: Path) -> None:
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

    def _open(self, timeout: float) -> sqlite3.Connection:
        """A connection to the existing state file (``mode=rw``: never creates one, so a removed
        file is not silently replaced by an empty database)."""
        uri = f"{self.path.resolve().as_uri()}?mode=rw"
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=timeout)

    def _connect_writer(self) -> sqlite3.Connection:
        # a short busy timeout: while another process holds the write lock, the writer retries
        # and the callers' own deadlines decide (group_commit)
        conn = self._open(timeout=0.1)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
        if self._max_bytes is not None:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(1, self._max_bytes // page)}")
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        conn = self._open(timeout=self.timeout_s)
        conn.execute("PRAGMA query_only=1")
        return conn

    def _check_file(self) -> Optional[str]:
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

    def _checkpoint_loop(self) -> None:
        """Copies the WAL back into the database off the commit path (PASSIVE: never blocks
        the writer or readers)."""
        conn: Optional[sqlite3.Connection] = None
        while not self._stop.wait(CHECKPOINT_INTERVAL_S):
            try:
                if conn is None:
                    conn = self._open(timeout=0.1)
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

    def set_size_limit(self, max_bytes: Optional[int]) -> None:
        """Fault injection: the file stops growing at ``max_bytes`` (None: no limit)."""

        def apply(conn: sqlite3.Connection) -> None:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            pages = 4294967294 if max_bytes is None else max(1, max_bytes // page)
            conn.execute(f"PRAGMA max_page_count = {pages}")

        self._max_bytes = max_bytes
        self._submit(fn=apply)

    # -- decoding, session by session ---------------------------------------------------------

    def _step(self, key: SessionKey, epoch: object, step: object, text: object) -> StepRecord:
        try:
            return codec.step_from_json(int(epoch), int(step), text)  # type: ignore[call-overload,arg-type]
        except _DECODE_ERRORS as exc:
            raise CorruptRecord(key, f"step {step}: {_why(exc)}") from None

    def _session(self, conn: sqlite3.Connection, row: tuple) -> StoredSession:
        (job_id, attempt, config, status, created_ms, last_active_ms, open_epoch, open_window,
         step_count, last_step, pruned_ms) = row
        key = SessionKey(job_id, attempt)
        args = (job_id, attempt)
        try:
            decoded_config = codec.config_from_json(config, self.profiles)
        except _DECODE_ERRORS as exc:
            raise CorruptRecord(key, f"its configuration: {_why(exc)}") from None
        try:
            epochs = []
            for epoch, summary in conn.execute(
                "SELECT epoch, summary FROM epochs WHERE job_id=? AND attempt=? ORDER BY epoch", args
            ):
                try:
                    epochs.append(codec.epoch_from_json(summary))
                except _DECODE_ERRORS as exc:
                    raise CorruptRecord(key, f"epoch {epoch}: {_why(exc)}") from None
            open_steps = tuple(self._epoch_steps(conn, key, int(open_epoch)))
            if pruned_ms:  # the steps are gone: their count and last step were kept
                count, last, last_at = int(step_count), int(last_step), 0
            else:
                count, last = conn.execute(
                    "SELECT COUNT(*), COALESCE(MAX(step), -1) FROM steps WHERE job_id=? AND attempt=?", args
                ).fetchone()
                newest = conn.execute(
                    "SELECT at_ms FROM steps WHERE job_id=? AND attempt=? ORDER BY step DESC LIMIT 1", args
                ).fetchone()
                last_at = int(newest[0]) if newest else 0
            return StoredSession(
                config=decoded_config,
                status=SessionStatus(status),
                created_ms=int(created_ms),
                last_active_ms=max(int(last_active_ms), last_at),
                closed_epochs=tuple(epochs),
                open_epoch=int(open_epoch),
                open_window=codec.windows_from_json(open_window),
                open_steps=open_steps,
                step_count=count,
                last_step=last,
                steps_pruned_ms=max(int(pruned_ms), 0),
            )
        except _DECODE_ERRORS as exc:
            raise CorruptRecord(key, f"its session row: {_why(exc)}") from None

    def _epoch_steps(self, conn: sqlite3.Connection, key: SessionKey, epoch: int) -> list[StepRecord]:
        """The steps of ``epoch``, found from the newest step backwards: epochs only grow with
        steps, and the epochs asked for are the open one (restore) or its last (amendments)."""
        out = []
        for s, e, r in conn.execute(
            "SELECT step, epoch, record FROM steps WHERE job_id=? AND attempt=? ORDER BY step DESC",
            (key.job_id, key.attempt),
        ):
            if e < epoch:
                break
            if e == epoch:
                out.append(self._step(key, e, s, r))
        out.reverse()
        return out

    # -- reads (reader threads, bounded in time) ----------------------------------------------

    def get_step(self, key: SessionKey, step: int) -> Optional[StepRecord]:
        rows = self._readers.run(
            lambda conn: conn.execute(
                "SELECT epoch, record FROM steps WHERE job_id=? AND attempt=? AND step=?",
                (key.job_id, key.attempt, step),
            ).fetchall()
        )
        return self._step(key, rows[0][0], step, rows[0][1]) if rows else None

    def step_range(self, key: SessionKey, first: int, last: int, limit: int) -> list[StepRecord]:
        def read(conn: sqlite3.Connection) -> list[StepRecord]:
            rows = conn.execute(
                "SELECT step, epoch, record FROM steps WHERE job_id=? AND attempt=? AND step BETWEEN ? AND ? "
                "ORDER BY step LIMIT ?",
                (key.job_id, key.attempt, first, last, limit),
            ).fetchall()
            out = []
            for i, (s, e, r) in enumerate(rows):
                out.append(self._step(key, e, s, r))
                if i % 64 == 63:
                    time.sleep(0)  # a page of history is thousands of records: let Reports in between
            return out

        return self._readers.run(read)

    def iter_steps(self, key: SessionKey) -> Iterator[StepRecord]:
        return iter(self.step_range(key, 0, 2**63 - 1, 2**62))

    def epoch_steps(self, key: SessionKey, epoch: int) -> list[StepRecord]:
        return self._readers.run(lambda conn: self._epoch_steps(conn, key, epoch))

    def load(self, open_only: bool = True) -> list[Union[StoredSession, Quarantined]]:
        where = f"WHERE status={int(SessionStatus.OPEN)}" if open_only else ""

        def read(conn: sqlite3.Connection) -> list[Union[StoredSession, Quarantined]]:
            out: list[Union[StoredSession, Quarantined]] = []
            rows = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions {where} ORDER BY created_ms, job_id, attempt").fetchall()
            for row in rows:
                try:
                    out.append(self._session(conn, row))
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
            return self._session(conn, rows[0]) if rows else None

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

