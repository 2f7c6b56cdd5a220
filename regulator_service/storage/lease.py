"""Leases on PostgreSQL: which regulator replica owns a job, with a fencing token.

Several replicas share one PostgreSQL database; each job (all its attempts) is owned by one replica
at a time through a row of ``leases``. Taking a lease over raises its ``token`` by one; every write
of the job runs ``fence`` first in its own transaction, a locking read that matches only the token
the writer holds, so a replica whose lease was taken over has its writes refused by the database
(``SessionFenced``), whatever its own clock says. Expiry is judged by the database's clock (``now()``),
never by a replica's: a paused or partitioned replica cannot keep a lease by believing in it.

This module holds the SQL and one small connection of its own (takes and renewals are short
autocommit statements, off the group-commit path); the store runs ``fence`` statements inside its
write transactions (the ``guard`` of ``PostgreSQLStore``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from .base import StoreError

log = logging.getLogger(__name__)

Guard = tuple[str, tuple]  # SQL and parameters: a statement that must return exactly one row

# Part of the PostgreSQL schema (the store's migrations run it). A row is never deleted, so that a
# job's token only ever grows, whatever happens to its sessions.
LEASES_DDL = """
CREATE TABLE IF NOT EXISTS leases (
    job_id     TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    token      BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
)
"""

# Taken when free, expired (by the database's clock), or already this replica's (owner names are
# never reused). The token stays only if it is the one we hold: nobody else can have written in
# between; any other take raises it, fencing every write made under an older one. Otherwise (another
# replica's lease runs) no row comes back.
_TAKE = """
INSERT INTO leases AS l (job_id, owner, token, expires_at)
VALUES (%(job)s, %(owner)s, 1, now() + %(ttl)s::float8 * interval '1 second')
ON CONFLICT (job_id) DO UPDATE SET
    owner = EXCLUDED.owner,
    token = CASE WHEN l.owner = EXCLUDED.owner AND l.token = %(mine)s::bigint THEN l.token ELSE l.token + 1 END,
    expires_at = EXCLUDED.expires_at
WHERE l.owner = EXCLUDED.owner OR l.expires_at <= now()
RETURNING token
"""
_REMAINING = "SELECT GREATEST(0, EXTRACT(EPOCH FROM expires_at - now())) FROM leases WHERE job_id = %s"
# A renewal never waits while it holds a row: a group commit holds FOR SHARE on the lease row of
# every job it writes, in its writes' order, so a renewal that locked its rows in its own order
# and waited for the next could close a cycle (a deadlock PostgreSQL breaks by failing one side).
# All rows that are free at once in one statement (SKIP LOCKED), then the rest one row each.
_RENEW = """
UPDATE leases SET expires_at = now() + %s::float8 * interval '1 second'
WHERE job_id IN (
    SELECT job_id FROM leases WHERE owner = %s AND job_id = ANY(%s) AND expires_at > now()
    FOR UPDATE SKIP LOCKED)
RETURNING job_id, token
"""
_RENEW_ONE = """
UPDATE leases SET expires_at = now() + %s::float8 * interval '1 second'
WHERE owner = %s AND job_id = %s AND expires_at > now()
RETURNING job_id, token
"""
_RELEASE = "UPDATE leases SET expires_at = now() WHERE owner = %s AND expires_at > now()"
# FOR SHARE: a takeover (an UPDATE of the row) waits for the write's transaction to end, and then
# finds the token it checks unchanged or bumps it for every later write; no row version per write.
FENCE = "SELECT 1 FROM leases WHERE job_id = %s AND owner = %s AND token = %s FOR SHARE"
# The fences of many writes in one statement (a group commit's Reports, ``pg_appends``): the jobs
# among arrays of FENCE's parameters (sent binary, %b) whose lease matches, each row locked as
# FENCE locks it (a takeover waiting on one is re-checked against the token when it commits, and
# then not matched).
FENCE_MANY = (
    "SELECT job_id FROM leases WHERE (job_id, owner, token) IN "
    "(SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[])) FOR SHARE"
)


@dataclass(frozen=True)
class Held:
    """The job is leased by another live replica for about ``remaining_s`` more (database clock)."""

    remaining_s: float


class LeaseTable:
    """The ``leases`` rows of one replica (``owner``: unique per process, never reused)."""

    def __init__(self, dsn: str, owner: str, ttl_s: float, timeout_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the lease TTL must be positive, got {ttl_s:g}")
        self.dsn = dsn
        self.owner = owner
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()  # one connection, one statement at a time
        self._conn: Any = None

    def _execute(self, sql: str, params: Any) -> list[tuple]:
        """One autocommit statement; a broken connection is dropped and reopened by the next."""
        import psycopg  # the server extra; only a PostgreSQL store gets here

        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    ms = max(1, int(self.timeout_s * 1000))
                    self._conn = psycopg.connect(
                        self.dsn, autocommit=True, connect_timeout=max(1, int(self.timeout_s + 0.999)),
                        options=f"-c statement_timeout={ms} -c lock_timeout={ms}",
                    )
                with self._conn.cursor() as cur:
                    cur.execute(sql, params)
                    return cur.fetchall() if cur.description is not None else []
            except psycopg.Error as exc:
                self._drop()
                raise StoreError(f"lease table unreachable: {type(exc).__name__}: {exc}") from exc

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # already broken
                pass
            self._conn = None

    def take(self, job: str, mine: Optional[int]) -> Union[int, Held]:
        """The job's lease for this replica: its token (``mine`` kept if it is still ours), or
        ``Held`` while another replica's lease runs."""
        rows = self._execute(_TAKE, {"job": job, "owner": self.owner, "ttl": self.ttl_s, "mine": mine})
        if rows:
            return int(rows[0][0])
        left = self._execute(_REMAINING, (job,))
        return Held(float(left[0][0]) if left else 0.0)

    def renew(self, jobs: Iterable[str]) -> dict[str, int]:
        """Extends this replica's unexpired leases of ``jobs``; returns those still held, with tokens."""
        wanted = list(jobs)
        if not wanted:
            return {}
        held = {job: int(token) for job, token in self._execute(_RENEW, (self.ttl_s, self.owner, wanted))}
        for job in wanted:  # a row a write held just now (or a lease no longer ours): alone, waiting
            if job not in held:
                held.update((j, int(t)) for j, t in self._execute(_RENEW_ONE, (self.ttl_s, self.owner, job)))
        return held

    def release_all(self) -> None:
        """Ends every lease of this replica now (a clean shutdown: others take over at once)."""
        self._execute(_RELEASE, (self.owner,))

    def fence(self, job: str, token: Optional[int]) -> Guard:
        """The statement a write of ``job`` runs first: it returns one row only while ``token``
        is the job's current token and this replica its owner, and holds the row until the
        write commits, so that no takeover passes it."""
        return (FENCE, (job, self.owner, -1 if token is None else token))

    def close(self) -> None:
        with self._lock:
            self._drop()
