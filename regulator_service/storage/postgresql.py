"""The PostgreSQL store (``serve --store postgresql://USER@HOST:PORT/DB``): the same state as the
SQLite file, in a database several regulators can share.

Every durable point is committed before the answer leaves the server, with ``synchronous_commit``
as the database has it (on by default: the commit is on the server's disk); concurrent requests
share one transaction (``pg_commit``). Rows hold the JSON text SQLite holds (one codec), so a
session whose rows do not decode is quarantined on its own as with SQLite. The schema is the
server's (``pg_schema``: versioned, migrated forward, a newer one refused untouched). Reads run on
a few connections of their own (``readers``), each re-made when the server went away. Every call
is bounded by ``timeout_s`` (``--store-timeout``; also the connect timeout and the server's
``statement_timeout``): while PostgreSQL is down calls answer UNAVAILABLE, health says why, and
the store reconnects once it is back.

Fencing: ``guard(key)`` (optional) gives a statement that runs first in the transaction of every
write of that session; unless it changes or returns exactly one row the write is refused
(``SessionFenced``) and nothing of it is written. A lease with a fencing token is enforced that
way by the database itself, not by a replica's clock.
"""

from __future__ import annotations

import json
from typing import Callable, Optional, Sequence, TypeVar

import psycopg

from ..model import SessionKey, StepRecord
from ..policy import BUILTIN_PROFILES, ProfileRegistry
from .base import StoreError
from .pg_commit import PgWriter
from .pg_ops import PgOp
from .pg_rows import ROWS as PG_ROWS
from .pg_schema import check_dsn, connect, migrate, one_line, usable, where
from .readers import ReadPool
from .rows import step as decode_step
from .sql_store import SqlStore
from .statements import POSTGRESQL, Shape, Statement

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 2.0
READERS = 4
Guard = Callable[[SessionKey], tuple[str, tuple]]
_PROBE: tuple[Statement, ...] = (("SELECT 1", (), None),)


class _Reader:
    """One reader thread's connection, re-made when the server went away."""

    def __init__(self, dsn: str, timeout_s: float) -> None:
        self._dsn = dsn
        self._timeout_s = timeout_s
        self._conn: Optional[psycopg.Connection] = None

    def call(self, fn: Callable[[psycopg.Connection], T]) -> T:
        if not usable(self._conn):
            self.close()
            self._conn = connect(self._dsn, self._timeout_s)
        try:
            return fn(self._conn)
        except psycopg.Error as exc:
            if not self._conn.broken:
                raise StoreError(f"state read failed: {where(self._dsn)}: {one_line(exc)}") from exc
            self.close()  # the server went away since the last read: once more, on a new connection
        self._conn = connect(self._dsn, self._timeout_s)
        try:
            return fn(self._conn)
        except psycopg.Error as exc:
            if self._conn.broken:
                self.close()
            raise StoreError(f"state read failed: {where(self._dsn)}: {one_line(exc)}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgreSQLStore(SqlStore):
    SQL = POSTGRESQL
    ROWS = PG_ROWS

    def __init__(
        self,
        dsn: str,
        profiles: ProfileRegistry = BUILTIN_PROFILES,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        readers: int = READERS,
        guard: Optional[Guard] = None,
    ) -> None:
        """``StoreError`` (one line) if the server cannot be reached or its schema is newer;
        ``ValueError`` if ``dsn`` is not a PostgreSQL URL."""
        self.dsn = check_dsn(dsn)
        self.profiles = profiles
        self.timeout_s = timeout_s
        self.guard = guard
        migrate(dsn, timeout_s)
        self._writer = PgWriter(dsn, timeout_s)
        self._readers = ReadPool(lambda: _Reader(dsn, timeout_s), readers, timeout_s)  # type: ignore[arg-type,return-value]

    def __repr__(self) -> str:
        return f"PostgreSQLStore({where(self.dsn)})"

    # -- commits and reads (``SqlStore``) ------------------------------------------------------

    def _read(self, fn: Callable[[psycopg.Connection], T], bounded: bool = True) -> T:
        return self._readers.run(lambda reader: reader.call(fn), bounded=bounded)  # type: ignore[attr-defined]

    def _write(self, key: SessionKey, statements: Sequence[Statement], shape: Optional[Shape] = None) -> None:
        """With a guard, its statement runs first, and the op is refused unless it matches."""
        if self.guard is None:
            self._writer.submit(PgOp(statements, shape=shape))
            return
        sql, params = self.guard(key)
        self._writer.submit(PgOp(((sql, params, 1), *statements), fenced=True))

    def _write_fn(self, fn: Callable[[psycopg.Connection], None]) -> None:
        self._writer.submit(PgOp(fn=fn))

    # -- reads of its own ---------------------------------------------------------------------

    def step_range(self, key: SessionKey, first: int, last: int, limit: int) -> list[StepRecord]:
        rows = self._read(
            lambda conn: conn.execute(
                POSTGRESQL.step_range,
                (key.job_id, key.attempt, first, min(last, 2**63 - 1), min(limit, 2**63 - 1)),
            ).fetchall()
        )
        return [decode_step(key, e, s, r) for s, e, r in rows]

    def latest_attempt(self, job_id: str) -> Optional[int]:
        row = self._read(lambda conn: conn.execute(POSTGRESQL.latest_attempt, (job_id,)).fetchone())
        return None if row is None or row[0] is None else int(row[0])

    def attempt_opened_by(self, job_id: str, open_token: str) -> Optional[int]:
        """One query for the job's attempts (few); a config that is not JSON (quarantined) is
        skipped, not an error (``pg_input_is_valid`` needs PostgreSQL 16)."""
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT attempt, config FROM sessions WHERE job_id=%s AND strpos(config, %s) > 0 ORDER BY attempt",
                (job_id, open_token),
            ).fetchall()
        )
        for attempt, config in rows:
            try:
                if json.loads(config).get("open_token") == open_token:
                    return int(attempt)
            except (ValueError, AttributeError):
                continue
        return None

    def inactive_keys(self, limit: int) -> list[SessionKey]:
        rows = self._read(lambda conn: conn.execute(POSTGRESQL.inactive_keys, (limit,)).fetchall())
        return [SessionKey(job, int(attempt)) for job, attempt in rows]

    # -- health -------------------------------------------------------------------------------

    def health(self) -> Optional[str]:
        return self._writer.health()

    def probe(self) -> Optional[str]:
        return self._writer.probe(_PROBE)

    def close(self) -> None:
        self._writer.close()
        self._readers.close()

