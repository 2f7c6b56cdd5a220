"""Group commit on PostgreSQL: the writes of concurrent requests share one commit.

Callers queue their op and wait, each within its own timeout; one committer thread takes every
op queued so far and releases them after their commit returned, so "answered => durable" holds:
Reports' appends as one statement in one round trip (``pg_appends``), the other ops in one
``BEGIN ... COMMIT`` (equal-shaped ops as one ``executemany`` per statement, pipelined by
psycopg). When fewer ops are queued than the last batch had, the committer first waits for
them, briefly (``HOLD_S``, ``CommitQueue._gather``). A batch that fails for one op's sake (a
constraint, a guard that matched no row) is re-run op by op, so only that op fails; a failure
of the server or the connection fails the batch, and nothing of it was written. A connection lost during COMMIT leaves its batch in doubt
(``StoreInDoubt``): it is settled once a new connection has made sure the old server process is
gone, and the callers then re-read what was stored.

No request thread talks to PostgreSQL for a write, so every call is bounded: an op still queued
when its caller gives up is withdrawn (``StoreTimeout``), one being committed is in doubt. While
PostgreSQL is down every write fails at once and ``health()`` says why; ``probe()`` (the server's
store watch, every half second) pings the server on a connection of its own, so an idle regulator
notices too, and a probe write reconnects once it answers again. A commit stuck on a server that
does not answer (stopped, partitioned) has its socket shut down after twice the store timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Sequence

import psycopg

from .base import StoreError, StoreInDoubt
from .commit_queue import DONE, CommitQueue
from . import pg_appends
from .pg_ops import PgOp, execute, fenced_out, one_insert, op_error, run_alone
from .pg_schema import Pinger, connect, one_line, shutdown, usable, where
from .statements import Statement

log = logging.getLogger(__name__)
# The longest a commit waits for the followers of the last batch (``CommitQueue._gather``): a
# commit on PostgreSQL costs a round trip, the backend's wake-up and a WAL flush whatever it
# holds. At 4 jobs in flight it took a third off the database's CPU per Report and 10-20% off
# the server's, latency unchanged (docs/performance.md). A lone job never waits.
HOLD_S = 0.001


class PgWriter(CommitQueue[PgOp]):
    def __init__(self, dsn: str, timeout_s: float) -> None:
        self._dsn = dsn
        self._conn: Optional[psycopg.Connection] = connect(dsn, timeout_s)
        super().__init__(timeout_s, f"is {where(dsn)} answering?", hold_s=HOLD_S)
        self._generation = 0  # connections made; in-doubt batches wait for the next one
        self._doubt: list[tuple[int, Callable[[], None]]] = []
        self._stale_pid: Optional[int] = None  # the server process of a connection lost mid-COMMIT
        self._pinger = Pinger(dsn, timeout_s)  # health checks on a connection of their own
        self._start("regulator-pg-commit", self._run)

    # -- callers ------------------------------------------------------------------------------

    def submit(self, op: PgOp, timeout_s: Optional[float] = None) -> None:
        """Runs ``op`` in the next group commit; returns once it is committed."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self._enqueue(op)
        self._wait(op, timeout)
        if op.error is not None:
            raise op.error

    def health(self) -> Optional[str]:
        return self._stuck() or self._failing

    def probe(self, statements: Sequence[Statement]) -> Optional[str]:
        """Pings the server while healthy; while failing, a real write on a helper thread
        (never more than one) whose success clears the failure."""
        self._cut_if_stuck()
        if self._failing is None:
            self._ping()
        self._probe_write(lambda: self.submit(PgOp(statements)))
        return self.health()

    def close(self) -> None:
        """Waits (bounded) for the commit in progress, fails what is still queued, then closes
        the connections."""
        if not self._stop():
            shutdown(self._conn)
            return
        self._finish(self._claim(), StoreError("the state store is closed"))
        self._drop(self._conn)
        self._pinger.close()

    # -- state --------------------------------------------------------------------------------

    def _dispatch(self, op: PgOp, fn: Callable[[], None]) -> None:
        if isinstance(op.error, StoreInDoubt):  # lost mid-COMMIT: settled on reconnection
            op.error.on_resolved(fn)
        else:
            super()._dispatch(op, fn)

    # -- the connection -----------------------------------------------------------------------

    def _live(self) -> psycopg.Connection:
        """The write connection, re-made if it was lost (``StoreError`` while the server
        cannot be reached)."""
        conn = self._conn
        if usable(conn):
            return conn  # type: ignore[return-value]
        self._drop(conn)
        conn = connect(self._dsn, self.timeout_s)
        self._conn = conn
        self._settle(conn)
        return conn

    def _drop(self, conn: Optional[psycopg.Connection]) -> None:
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass
        self._conn = None

    def _settle(self, conn: psycopg.Connection) -> None:
        """After a connection was lost mid-COMMIT: waits until its server process is gone (its
        transaction is then committed or not, for good), then lets the callers re-read."""
        pid, self._stale_pid = self._stale_pid, None
        if pid is not None:
            try:
                conn.execute("SELECT pg_terminate_backend(%s, %s)", (pid, int(self.timeout_s * 1000)))
            except psycopg.Error as exc:
                log.warning("could not make sure server process %d is gone: %s", pid, one_line(exc))
        with self._qlock:
            self._generation += 1
            ready = [fn for gen, fn in self._doubt if gen < self._generation]
            self._doubt = [(gen, fn) for gen, fn in self._doubt if gen >= self._generation]
        for fn in ready:
            threading.Thread(target=fn, name="regulator-store-resolved", daemon=True).start()

    def _when_settled(self, generation: int, fn: Callable[[], None]) -> None:
        with self._qlock:
            if self._generation <= generation:
                self._doubt.append((generation, fn))
                return
        threading.Thread(target=fn, name="regulator-store-resolved", daemon=True).start()

    # -- the committer ------------------------------------------------------------------------

    def _run(self) -> None:
        while self._next():
            try:  # connect before claiming: ops stay withdrawable while the server is unreachable
                conn = self._live()
            except StoreError as exc:
                self._fail(str(exc))
                self._finish(self._claim(), StoreError(f"state write failed, nothing was written: {exc}"))
                continue
            self._gather()
            batch = self._claim()
            if not batch:
                continue
            self._busy_since = since = time.monotonic()
            try:
                self._batch(conn, batch)
            except BaseException:  # never let the committer die: every later write would hang
                log.exception("state store commit failed")
                self._finish([op for op in batch if op.state != DONE], StoreError("state write failed: an internal error (see the server log)"))
            finally:
                self._busy_since = None
                self._committed(batch, since)

    def _batch(self, conn: psycopg.Connection, batch: list[PgOp]) -> None:
        """Reports' appends as one statement, the other ops in one transaction."""
        appends, rest = pg_appends.split(batch)
        if appends:
            self._appends(conn, appends, *pg_appends.statement(appends))
            if not rest:
                return
            try:
                conn = self._live()
            except StoreError as exc:
                self._finish(rest, StoreError(f"state write failed, nothing was written: {exc}"))
                return
        self._transaction(conn, rest)

    def _transaction(self, conn: psycopg.Connection, batch: list[PgOp]) -> None:
        if len(batch) == 1 and one_insert(batch[0]):
            sql, params, _ = batch[0].statements[0]
            if self._alone(conn, batch, sql, params) is not None:
                self._finish(batch, None)
            return
        try:
            conn.execute("BEGIN")
            execute(conn, batch)
        except Exception as exc:
            if self._failed(conn, exc, batch):
                return
            if len(batch) == 1:
                self._finish(batch, op_error(exc))
            else:
                self._one_by_one(batch)
            return
        if self._commit(conn, batch):
            self._finish(batch, None)

    def _alone(self, conn: psycopg.Connection, ops: list[PgOp], sql: str, params: tuple) -> Optional[list[tuple]]:
        """One statement that writes ``ops`` by itself (autocommit: its own transaction in one
        round trip, no BEGIN or COMMIT of its own): its rows once committed, else None and
        ``ops`` finished with the failure (re-run op by op when there are several)."""
        try:
            cur = conn.execute(sql, params)
            rows = cur.fetchall() if cur.description is not None else []
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                self._in_doubt(conn, ops, exc)
            elif self._store_level(exc, conn):
                self._finish(ops, StoreError(f"state write failed, nothing was written: {self._failing}"))
            elif len(ops) > 1:
                self._one_by_one(ops)
            else:
                self._finish(ops, op_error(exc))
            return None
        self.commits += 1
        self._failing = None
        return rows

    def _appends(self, conn: psycopg.Connection, batch: list[PgOp], sql: str, params: tuple) -> None:
        """Reports' rows in one statement (``pg_appends``); an op whose row was not written was
        fenced."""
        rows = self._alone(conn, batch, sql, params)
        if rows is None:
            return
        written = set(rows)
        self._finish([op for op in batch if pg_appends.row(op) in written], None)
        for op in batch:
            if pg_appends.row(op) not in written:
                self._finish([op], fenced_out(op))

    def _in_doubt(self, conn: psycopg.Connection, batch: list[PgOp], exc: BaseException) -> None:
        """The connection was lost while committing: committed or not, unknown until the old
        server process is gone."""
        self._stale_pid = conn.info.backend_pid
        self._fail(f"{where(self._dsn)}: the connection was lost during COMMIT ({one_line(exc)})")
        self._drop(conn)
        generation = self._generation
        self._finish(batch, StoreInDoubt(
            f"the connection to {where(self._dsn)} was lost while committing; the outcome is "
            "settled once the store reconnects",
            lambda fn: self._when_settled(generation, fn),
        ))

    def _store_level(self, exc: BaseException, conn: psycopg.Connection) -> bool:
        """The server or the connection failed (not one op): the whole batch fails."""
        if conn.broken or conn.closed or isinstance(exc, psycopg.OperationalError):
            self._fail(f"{where(self._dsn)}: {one_line(exc)}")
            if conn.broken or conn.closed:
                self._drop(conn)
            return True
        return False

    def _failed(self, conn: psycopg.Connection, exc: BaseException, ops: list[PgOp]) -> bool:
        """After a statement failed: rolls back; True (and ``ops`` failed) if the server or the
        connection failed, False if the op itself did."""
        self._abort(conn)
        if self._store_level(exc, conn):
            self._finish(ops, StoreError(f"state write failed, nothing was written: {self._failing}"))
            return True
        return False

    def _abort(self, conn: psycopg.Connection) -> None:
        if conn.closed or conn.broken:
            return
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error as exc:
            log.warning("rollback failed: %s", one_line(exc))
            self._drop(conn)

    def _commit(self, conn: psycopg.Connection, batch: list[PgOp]) -> bool:
        """COMMIT; False (and the batch finished with its error) if it failed."""
        try:
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            if conn.broken or conn.closed:  # the answer was lost: committed or not, unknown
                self._in_doubt(conn, batch, exc)
            else:
                self._abort(conn)
                self._store_level(exc, conn)
                self._finish(batch, StoreError(f"state write failed, nothing was written: {one_line(exc)}"))
            return False
        self.commits += 1
        self._failing = None
        return True

    def _one_by_one(self, batch: list[PgOp]) -> None:
        """Isolates the op that failed a batch: each in its own transaction."""
        for i, op in enumerate(batch):
            try:
                conn = self._live()
            except StoreError as exc:
                self._finish(batch[i:], StoreError(f"state write failed, nothing was written: {exc}"))
                return
            try:
                conn.execute("BEGIN")
                run_alone(conn, op)
            except Exception as exc:
                if self._failed(conn, exc, batch[i:]):
                    return
                self._finish([op], op_error(exc))
                continue
            if self._commit(conn, [op]):
                self._finish([op], None)

    # -- health -------------------------------------------------------------------------------

    def _ping(self) -> None:
        why = self._pinger.check()
        if why is not None:
            self._fail(why)

    def _cut_if_stuck(self) -> None:
        since, conn = self._busy_since, self._conn
        if since is not None and conn is not None and time.monotonic() - since > 2 * self.timeout_s:
            log.error("a commit has waited %.0fs for %s: cutting its connection", time.monotonic() - since, where(self._dsn))
            shutdown(conn)
