"""Group commit: the writes of concurrent requests share one SQLite transaction.

A request thread hands its ``WriteOp`` to the store and waits; one thread at a time (the leader,
see ``GroupCommitWriter``) takes every op queued so far, runs them in one ``BEGIN IMMEDIATE ...
COMMIT`` and releases each waiter after that commit, so "answered => durable" holds for every one
of them while 16 concurrent Reports cost one commit instead of 16. Ops of the same shape (the same statements)
run as one ``executemany`` per statement. A batch that fails for one op's sake (a constraint) is
re-run op by op, so only that op fails; a failure of the store itself (disk full, I/O error,
locked) fails the batch, and its ops change nothing.

Every wait is bounded (``timeout_s``): an op still queued when its caller gives up is withdrawn
(``StoreTimeout``: nothing changed); an op a leader is already executing (a hung disk) is
``StoreInDoubt``: its caller answers UNAVAILABLE and learns the outcome later. The leader's own
call cannot be interrupted while the kernel holds its thread; every other call is bounded. ``health()`` says
why writes fail (the last error, cleared by the next successful commit); ``probe()`` tries a small
real write so that recovery is seen without traffic.
"""

from __future__ import annotations

import _thread
import logging
import sqlite3
import threading
import time
from collections import deque
from typing import Callable, Optional, Sequence

from .base import StoreError, StoreInDoubt, StoreTimeout

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, CANCELLED, PROMOTED = range(5)
Statement = tuple[str, tuple, Optional[int]]  # SQL, parameters, expected rowcount (None: any)

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


class WriteOp:
    """One durable write: statements (batchable with ops of the same shape) or a function."""

    __slots__ = ("statements", "fn", "state", "error", "done", "callbacks", "shape")

    def __init__(
        self,
        statements: Sequence[Statement] = (),
        fn: Optional[Callable[[sqlite3.Connection], None]] = None,
        shape: Optional[object] = None,
    ) -> None:
        """``shape``: what ops of the same statements share (given by hot callers as a constant,
        else derived from the statements)."""
        self.statements = statements
        self.fn = fn
        if fn is not None:
            self.shape = None
        else:
            self.shape = shape if shape is not None else tuple((sql, expect is not None) for sql, _, expect in statements)
        self.state = PENDING
        self.error: Optional[BaseException] = None
        self.done = _thread.allocate_lock()
        self.done.acquire()  # released by the writer once the op is committed or failed
        self.callbacks: list[Callable[[], None]] = []

    def run_alone(self, conn: sqlite3.Connection) -> None:
        if self.fn is not None:
            self.fn(conn)
            return
        for sql, params, expect in self.statements:
            cur = conn.execute(sql, params)
            if expect is not None and cur.rowcount != expect:
                raise sqlite3.IntegrityError(f"expected {expect} row(s) changed by {sql.split()[0]}, got {cur.rowcount}")


def _run_group(conn: sqlite3.Connection, ops: list[WriteOp]) -> None:
    """Ops of one shape: one executemany per statement position."""
    for i, (sql, _, expect) in enumerate(ops[0].statements):
        cur = conn.executemany(sql, [op.statements[i][1] for op in ops])
        if expect is not None:
            want = sum(op.statements[i][2] for op in ops)  # type: ignore[misc]
            if cur.rowcount != want:
                raise sqlite3.IntegrityError(f"expected {want} row(s) changed by {sql.split()[0]}, got {cur.rowcount}")


class GroupCommitWriter:
    """Leader/follower group commit on one write connection.

    A caller that finds no commit in progress leads: it commits the queue (its own op and any
    that arrive meanwhile) on its own thread, so a lone request pays no thread hand-off. Callers
    that arrive during a commit queue up and wait; when the leader is done it releases them and
    promotes the first one still waiting to lead the next batch.
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        check_file: Callable[[], Optional[str]],
        path: object,
        timeout_s: float,
    ) -> None:
        self._check_file = check_file  # the state file's identity: None, or why it is gone
        self._path = path
        self.timeout_s = timeout_s
        try:
            self._conn = connect()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state file {path} for writing: {exc}") from exc
        self._qlock = _thread.allocate_lock()
        self._queue: deque[WriteOp] = deque()
        self._leading = False
        self._closing = False
        self._busy_since: Optional[float] = None  # a commit in progress since (monotonic)
        self._failing: Optional[str] = None  # why the last write failed; None after a commit
        self._lost: Optional[str] = None  # the state file was removed or replaced: for good
        self._prober: Optional[threading.Thread] = None
        self.commits = 0  # transactions committed (a batch of ops is one)

    # -- callers ------------------------------------------------------------------------------

    def submit(self, op: WriteOp, timeout_s: Optional[float] = None) -> None:
        """Runs ``op`` in the next group commit; returns once it is committed."""
        if self._lost is not None:
            raise StoreError(self._lost)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        with self._qlock:
            if self._closing:
                raise StoreError("the state store is closed")
            self._queue.append(op)
            lead = not self._leading
            self._leading = True
        if not lead and not self._follow(op, timeout):
            return self._result(op)
        self._lead(op, deadline, timeout)
        return self._result(op)

    def _follow(self, op: WriteOp, timeout: float) -> bool:
        """Waits for a leader to commit ``op``; True if this caller was promoted to lead."""
        if not op.done.acquire(timeout=timeout):
            with self._qlock:
                state = op.state
                if state == PENDING:
                    op.state = CANCELLED
            if state == PENDING:
                why = self._failing or self._lost
                self._fail(f"writes are not completing within {timeout:g}s" + (f": {why}" if why else ""))
                raise StoreTimeout(
                    f"the state store did not complete the write within {timeout:g}s; nothing was changed"
                    + (f" ({why})" if why else "")
                )
            if state == RUNNING:
                self._fail(f"a write has been running for more than {timeout:g}s (is the disk hung?)")
                raise StoreInDoubt(
                    f"the state store did not complete the write within {timeout:g}s and it is still "
                    "running (is the disk hung?); its outcome is settled before this session takes another write",
                    lambda fn: self._on_resolved(op, fn),
                )
            op.done.acquire()  # promoted or finished just now: the release is ours
        return op.state == PROMOTED

    @staticmethod
    def _result(op: WriteOp) -> None:
        if op.error is not None:
            raise op.error

    def health(self) -> Optional[str]:
        since = self._busy_since
        if since is not None and time.monotonic() - since > self.timeout_s:
            return f"a write has been running for {time.monotonic() - since:.0f}s (is the disk hung?)"
        return self._lost or self._failing

    def probe(self, statements: Sequence[Statement]) -> Optional[str]:
        """While unhealthy: a real write (``statements``) on a helper thread (never more than
        one, so a hung disk holds one thread, not one per probe); its success clears the failure."""
        if self._lost is None:
            lost = self._check_file()
            if lost is not None:
                self._lose(lost)
        if self._lost is None and self._failing is not None and (self._prober is None or not self._prober.is_alive()):

            def attempt() -> None:
                try:
                    self.submit(WriteOp(statements))
                except StoreError:
                    pass

            self._prober = threading.Thread(target=attempt, name="regulator-store-probe", daemon=True)
            self._prober.start()
            self._prober.join(self.timeout_s * 2)
        return self.health()

    def close(self, finalize: Optional[Callable[[sqlite3.Connection], None]] = None) -> None:
        """Waits (bounded) for the commit in progress, then closes the connection."""
        deadline = time.monotonic() + max(self.timeout_s, 1.0) * 5
        while True:
            with self._qlock:
                self._closing = True
                if not self._leading:
                    self._leading = True  # nobody leads again
                    break
            if time.monotonic() > deadline:
                log.warning("closing the state store while a write is still running")
                return
            time.sleep(0.01)
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

    def _fail(self, why: str) -> None:
        if self._failing != why:
            log.error("state store failing: %s", why)
        self._failing = why

    def _lose(self, why: str) -> None:
        if self._lost is None:
            log.error("%s; refusing every write from now on (restart the server to start over)", why)
        self._lost = why

    def _on_resolved(self, op: WriteOp, fn: Callable[[], None]) -> None:
        with self._qlock:
            if op.state != DONE:
                op.callbacks.append(fn)
                return
        threading.Thread(target=fn, name="regulator-store-resolved", daemon=True).start()

    def _finish(self, ops: Sequence[WriteOp], error: Optional[BaseException]) -> None:
        for op in ops:
            with self._qlock:
                op.error = error
                op.state = DONE
                callbacks, op.callbacks = op.callbacks, []
            op.done.release()
            for fn in callbacks:  # a caller gave up on this op: let it re-read what was stored
                threading.Thread(target=fn, name="regulator-store-resolved", daemon=True).start()

    # -- the leader ---------------------------------------------------------------------------

    def _lead(self, own: WriteOp, deadline: float, timeout: float) -> None:
        """Commits one batch (``own`` and whatever is queued), then hands the lead on."""
        try:
            self._batch(own, deadline, timeout)
        finally:
            with self._qlock:
                successor = None
                if not self._closing:
                    successor = next((op for op in self._queue if op.state == PENDING), None)
                if successor is not None:
                    successor.state = PROMOTED
                else:
                    self._leading = False
            if successor is not None:
                successor.done.release()

    def _begin(self, own: WriteOp, deadline: float, timeout: float) -> bool:
        """BEGIN IMMEDIATE, retried while another process holds the write lock, until the
        leader's own deadline (then its op is withdrawn: False)."""
        while True:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                return True
            except sqlite3.OperationalError as exc:
                if primary_code(exc) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                if time.monotonic() > deadline:
                    why = describe(exc, self._path)
                    self._fail(why)
                    with self._qlock:
                        if own.state in (PENDING, PROMOTED):
                            own.state = CANCELLED
                    own.error = StoreTimeout(
                        f"the state store did not complete the write within {timeout:g}s; nothing was changed ({why})"
                    )
                    return False

    def _claim(self) -> list[WriteOp]:
        with self._qlock:
            batch = [op for op in self._queue if op.state in (PENDING, PROMOTED)]
            self._queue.clear()
            for op in batch:
                op.state = RUNNING
        return batch

    def _batch(self, own: WriteOp, deadline: float, timeout: float) -> None:
        # the file's identity is checked after each commit (and by probe()): a batch committed
        # into a removed file is answered as failed, and every later one refused here
        if self._lost is not None:
            self._finish(self._claim(), StoreError(self._lost))
            return
        try:
            if not self._begin(own, deadline, timeout):
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
        groups: dict[object, list[WriteOp]] = {}
        for op in batch:
            if op.shape is None:
                op.run_alone(conn)
            else:
                groups.setdefault(op.shape, []).append(op)
        for ops in groups.values():
            if len(ops) == 1:
                ops[0].run_alone(conn)
            else:
                _run_group(conn, ops)

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
