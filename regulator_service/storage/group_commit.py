"""Group commit: the writes of concurrent requests share one SQLite transaction.

A request thread hands its ``WriteOp`` to the store and waits; the store's committer thread (see
``GroupCommitWriter``) takes every op queued so far, runs them in one ``BEGIN IMMEDIATE ...
COMMIT`` and releases each waiter after that commit, so "answered => durable" holds for every one
of them while 16 concurrent Reports cost one commit instead of 16. Ops of the same shape (the same statements)
run as one ``executemany`` per statement. A batch that fails for one op's sake (a constraint) is
re-run op by op, so only that op fails; a failure of the store itself (disk full, I/O error,
locked) fails the batch, and its ops change nothing.

Every wait is bounded (``timeout_s``): an op still queued when its caller gives up is withdrawn
(``StoreTimeout``: nothing changed); an op a leader is already executing (a hung disk) is
``StoreInDoubt``: its caller answers UNAVAILABLE and learns the outcome later. No request thread
ever runs SQLite itself, so every call is bounded, the one whose own commit hangs included: the
thread the kernel holds on a frozen disk is the committer's. ``health()`` says
why writes fail (the last error, cleared by the next successful commit); ``probe()`` tries a small
real write so that recovery is seen without traffic.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Callable, Optional, Sequence

from .base import StoreError
from .commit_queue import PENDING, CommitQueue, Op, execute, run_alone
from .statements import Statement

log = logging.getLogger(__name__)

# Failures of the store as a whole (as opposed to one op's constraint): the batch fails.
_STORE_LEVEL = {
    sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH,
}


def primary_code(exc: BaseException) -> Optional[int]:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def describe(exc: BaseException, path: object) -> str:
    """An SQLite error as an operator reads it: "disk full" when it is one."""
    code = primary_code(exc)
    if code == sqlite3.SQLITE_FULL:
        return f"disk full: the state file {path} cannot grow ({exc})"
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"the state file {path} is locked by another process ({exc})"
    if code == sqlite3.SQLITE_IOERR:
        return f"I/O error on the state file {path} ({exc})"
    if code == sqlite3.SQLITE_READONLY:
        return f"the state file {path} is read-only ({exc})"
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return f"the state file {path} is corrupt ({exc})"
    return f"{type(exc).__name__}: {exc}"


def rollback(conn: sqlite3.Connection) -> None:
    """ROLLBACK only if a transaction is still open: after SQLITE_FULL, SQLite may already have
    rolled back, and a blind ROLLBACK would replace the real error with "no transaction is active"."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("rollback failed: %s", exc)


class WriteOp(Op):
    """One durable write on the state file: statements or a function of the connection."""

    __slots__ = ()

    def run_alone(self, conn: sqlite3.Connection) -> None:
        run_alone(conn, self, _mismatch)


def _mismatch(op: Optional[Op], i: int, verb: str, want: int, got: int) -> Exception:
    return sqlite3.IntegrityError(f"expected {want} row(s) changed by {verb}, got {got}")


class GroupCommitWriter(CommitQueue[WriteOp]):
    """Group commit on one write connection, run by one committer thread.

    Callers queue their op and wait for it, each within its own timeout; the committer takes
    every op queued so far into one transaction, releases them after its COMMIT and takes the
    next batch (ops that arrived meanwhile). A lone request pays one thread hand-off for a wait
    that can always end on time.
    """

    _doubt_note = " (is the disk hung?)"

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        check_file: Callable[[], Optional[str]],
        path: object,
        timeout_s: float,
    ) -> None:
        super().__init__(timeout_s, "is the disk hung?")
        self._check_file = check_file  # the state file's identity: None, or why it is gone
        self._path = path
        try:
            self._conn = connect()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state file {path} for writing: {exc}") from exc
        self._lost: Optional[str] = None  # the state file was removed or replaced: for good
        self._start("regulator-store-commit", self._run)

    # -- callers ------------------------------------------------------------------------------

    def submit(self, op: WriteOp, timeout_s: Optional[float] = None) -> None:
        """Runs ``op`` in the next group commit; returns once it is committed, or raises
        ``StoreTimeout`` (withdrawn, nothing changed) or ``StoreInDoubt`` (still running) after
        ``timeout_s`` (the store's timeout by default)."""
        if self._lost is not None:
            raise StoreError(self._lost)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self._enqueue(op)
        self._wait(op, timeout)
        if op.error is not None:
            raise op.error

    def _withdrawn(self, timeout: float) -> Optional[str]:
        why = self._failing or self._lost
        self._fail(f"writes are not completing within {timeout:g}s" + (f": {why}" if why else ""))
        return why

    def health(self) -> Optional[str]:
        return self._stuck() or self._lost or self._failing

    def probe(self, statements: Sequence[Statement]) -> Optional[str]:
        """While unhealthy: a real write (``statements``) on a helper thread (never more than
        one, so a hung disk holds one thread, not one per probe); its success clears the failure."""
        if self._lost is None:
            lost = self._check_file()
            if lost is not None:
                self._lose(lost)
        if self._lost is None:
            self._probe_write(lambda: self.submit(WriteOp(statements)))
        return self.health()

    def close(self, finalize: Optional[Callable[[sqlite3.Connection], None]] = None) -> None:
        """Waits (bounded) for the commit in progress, fails what is still queued, then closes
        the connection."""
        if not self._stop():
            return
        self._finish(self._claim(), StoreError("the state store is closed"))
        try:
            if finalize is not None and self._lost is None:
                finalize(self._conn)
        except sqlite3.Error as exc:
            log.warning("final checkpoint of %s skipped: %s", self._path, describe(exc, self._path))
        finally:
            rollback(self._conn)
            self._conn.close()

    # -- state --------------------------------------------------------------------------------

    def _lose(self, why: str) -> None:
        if self._lost is None:
            log.error("%s; refusing every write from now on (restart the server to start over)", why)
        self._lost = why

    # -- the committer ------------------------------------------------------------------------

    def _run(self) -> None:
        """The committer thread: one batch at a time until the store closes."""
        while self._next():
            try:
                self._batch()
            except BaseException:  # never let the committer die: every later write would hang
                log.exception("state store commit failed")
                self._finish(self._claim(), StoreError("state write failed: an internal error (see the server log)"))

    def _waiting(self) -> bool:
        """Whether an op in the queue still waits (dropping those their callers gave up on)."""
        with self._qlock:
            live = [op for op in self._queue if op.state == PENDING]
            if len(live) != len(self._queue):
                self._queue.clear()
                self._queue.extend(live)
            return bool(live) and not self._closing

    def _begin(self) -> bool:
        """BEGIN IMMEDIATE, retried while another process holds the write lock and an op still
        waits (each caller gives up at its own deadline: False once none waits)."""
        started = time.monotonic()
        while True:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                return True
            except sqlite3.OperationalError as exc:
                if primary_code(exc) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                waiting = self._waiting()
                if not waiting or time.monotonic() - started > self.timeout_s:
                    self._fail(describe(exc, self._path))
                if not waiting:
                    return False

    def _batch(self) -> None:
        # the file's identity is checked after each commit (and by probe()): a batch committed
        # into a removed file is answered as failed, and every later one refused here
        if self._lost is not None:
            self._finish(self._claim(), StoreError(self._lost))
            return
        try:
            if not self._begin():
                return
        except sqlite3.Error as exc:
            why = describe(exc, self._path)
            self._fail(why)
            self._finish(self._claim(), StoreError(f"state write failed: {why}"))
            return
        batch = self._claim()
        if not batch:
            rollback(self._conn)
            return
        self._busy_since = time.monotonic()
        try:
            self._commit(batch)
        finally:
            self._busy_since = None

    def _commit(self, batch: list[WriteOp]) -> None:
        conn = self._conn
        try:
            self._execute(conn, batch)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            rollback(conn)
            if primary_code(exc) in _STORE_LEVEL or len(batch) == 1:
                why = describe(exc, self._path)
                if primary_code(exc) in _STORE_LEVEL:
                    self._fail(why)
                self._finish(batch, StoreError(f"state write failed, nothing was written: {why}"))
            else:
                self._one_by_one(conn, batch)
            return
        except BaseException as exc:  # a bug in an op: that batch fails, the store lives on
            rollback(conn)
            log.exception("state write failed")
            self._finish(batch, StoreError(f"state write failed: {type(exc).__name__}: {exc}"))
            return
        self.commits += 1
        lost = self._check_file()
        if lost is not None:  # committed into a file that is no longer the state file
            self._lose(lost)
            self._finish(batch, StoreError(lost))
            return
        self._failing = None
        self._finish(batch, None)

    @staticmethod
    def _execute(conn: sqlite3.Connection, batch: list[WriteOp]) -> None:
        execute(conn, batch, _mismatch)

    def _one_by_one(self, conn: sqlite3.Connection, batch: list[WriteOp]) -> None:
        """Isolates the op that failed a batch: each in its own transaction."""
        for op in batch:
            try:
                conn.execute("BEGIN IMMEDIATE")
                op.run_alone(conn)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                rollback(conn)
                self._finish([op], StoreError(f"state write failed, nothing was written: {describe(exc, self._path)}"))
                continue
            self.commits += 1
            self._finish([op], None)
