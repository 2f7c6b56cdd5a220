"""The PostgreSQL store's connections and schema: the server owns its tables and migrates them.

The schema version lives in ``regulator_schema`` (one row per applied migration). Migrations run
forward one step per transaction under an advisory lock, so replicas that start together migrate
once; a database whose schema is newer than this server knows is refused and never touched.
Connections are made here with the store's bounds (connect timeout, ``statement_timeout``) and
every failure is one line that names the server without the password.
"""

from __future__ import annotations

import select
import socket
import threading
from typing import Callable, Optional
from urllib.parse import urlsplit

import psycopg
from psycopg import conninfo as pg_conninfo

from .base import StoreError
from .lease import LEASES_DDL

SCHEMA_VERSION = 1
_MIGRATION_LOCK = 0x1F0_4E9  # pg_advisory_xact_lock key: one migrating replica at a time
SCHEMES = ("postgresql", "postgres")


def _create_v1(conn: psycopg.Connection) -> None:
    """The tables of SQLite's schema 2, with the same columns and the same JSON text, so that
    one codec decodes both (and a database can be copied row for row), and the replicas' leases."""
    conn.execute("""
        CREATE TABLE sessions (
            job_id TEXT NOT NULL,
            attempt BIGINT NOT NULL,
            config TEXT NOT NULL,
            status INTEGER NOT NULL,
            created_ms BIGINT NOT NULL,
            last_active_ms BIGINT NOT NULL,
            open_epoch BIGINT NOT NULL,
            open_window TEXT NOT NULL,
            step_count BIGINT NOT NULL DEFAULT 0,
            last_step BIGINT NOT NULL DEFAULT -1,
            steps_pruned_ms BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (job_id, attempt)
        )""")
    conn.execute("CREATE INDEX sessions_by_status ON sessions (status, created_ms)")
    conn.execute("""
        CREATE TABLE epochs (
            job_id TEXT NOT NULL,
            attempt BIGINT NOT NULL,
            epoch BIGINT NOT NULL,
            summary TEXT NOT NULL,
            PRIMARY KEY (job_id, attempt, epoch)
        )""")
    conn.execute("""
        CREATE TABLE steps (
            job_id TEXT NOT NULL,
            attempt BIGINT NOT NULL,
            step BIGINT NOT NULL,
            epoch BIGINT NOT NULL,
            record TEXT NOT NULL,
            at_ms BIGINT NOT NULL,
            PRIMARY KEY (job_id, attempt, step)
        )""")
    conn.execute(LEASES_DDL)  # which replica owns a job, with its fencing token (lease.py)


# MIGRATIONS[v] upgrades a database at schema version v to v + 1 (0 = no regulator tables yet).
MIGRATIONS: dict[int, Callable[[psycopg.Connection], None]] = {0: _create_v1}


def check_dsn(dsn: str) -> str:
    """``dsn`` if it is a PostgreSQL URL psycopg can parse, else ``ValueError`` (one line)."""
    scheme = urlsplit(dsn).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"--store must be a postgresql://USER@HOST:PORT/DATABASE URL, got {f'scheme {scheme!r}' if scheme else 'no scheme'}")
    try:
        params = pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"--store is not a valid PostgreSQL URL: {one_line(exc)}") from None
    ports = str(params.get("port") or "5432").split(",")
    if not all(p.strip().isdigit() and 0 < int(p) < 65536 for p in ports):
        raise ValueError(f"--store is not a valid PostgreSQL URL: port {params.get('port')!r} is not a port number")
    return dsn


def where(dsn: str) -> str:
    """The server and database a DSN names, for messages (never the password)."""
    try:
        d = pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "PostgreSQL"
    host = str(d.get("host") or "localhost")
    port = f":{d['port']}" if d.get("port") else ""
    return f"PostgreSQL {d.get('user', '')}{'@' if d.get('user') else ''}{host}{port}/{d.get('dbname', '')}"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def connect(dsn: str, timeout_s: float) -> psycopg.Connection:
    """An autocommit connection whose statements are bounded by ``timeout_s`` (server side)."""
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=max(1, int(round(timeout_s))),
            application_name="inforeg-regulator",
            keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
        )
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to {where(dsn)}: {one_line(exc)}") from exc
    try:
        conn.execute(f"SET statement_timeout = {max(1, int(timeout_s * 1000))}")
        conn.execute(f"SET idle_in_transaction_session_timeout = {max(1000, int(timeout_s * 4000))}")
    except psycopg.Error as exc:
        conn.close()
        raise StoreError(f"cannot set up a connection to {where(dsn)}: {one_line(exc)}") from exc
    return conn


def migrate(dsn: str, timeout_s: float) -> int:
    """Brings the database to ``SCHEMA_VERSION`` (refusing a newer one untouched); returns the
    version found."""
    conn = connect(dsn, timeout_s)
    try:
        conn.execute("SET statement_timeout = 0")  # a migration of a big database takes its time
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS regulator_schema "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            found = conn.execute("SELECT COALESCE(MAX(version), 0) FROM regulator_schema").fetchone()
        version = int(found[0]) if found else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{where(dsn)} has regulator schema version {version}; this server knows versions up "
                f"to {SCHEMA_VERSION} (refusing to touch it)"
            )
        start = version
        while version < SCHEMA_VERSION:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM regulator_schema").fetchone()
                if row is not None and int(row[0]) != version:  # another replica migrated meanwhile
                    version = int(row[0])
                    continue
                MIGRATIONS[version](conn)
                version += 1
                conn.execute("INSERT INTO regulator_schema (version) VALUES (%s)", (version,))
        return start
    except psycopg.Error as exc:
        raise StoreError(f"{where(dsn)} is unusable: {one_line(exc)}") from exc
    finally:
        conn.close()


class Pinger:
    """``SELECT 1`` on a connection of its own, bounded by the store timeout (a helper thread;
    never more than one at a time): an idle regulator notices a server that went away."""

    def __init__(self, dsn: str, timeout_s: float) -> None:
        self._dsn = dsn
        self._timeout_s = timeout_s
        self._conn: Optional[psycopg.Connection] = None
        self._thread: Optional[threading.Thread] = None

    def check(self) -> Optional[str]:
        """None if the server answered, else why not."""
        if self._thread is not None and self._thread.is_alive():
            return f"{where(self._dsn)} does not answer (a health check has waited over {self._timeout_s:g}s)"
        failure: list[str] = []
        self._thread = threading.Thread(target=self._ping, args=(failure,), name="regulator-store-ping", daemon=True)
        self._thread.start()
        self._thread.join(self._timeout_s)
        if self._thread.is_alive():
            shutdown(self._conn)
            return f"{where(self._dsn)} does not answer within {self._timeout_s:g}s"
        return failure[0] if failure else None

    def _ping(self, failure: list[str]) -> None:
        try:
            if not usable(self._conn):
                self.close()
                self._conn = connect(self._dsn, self._timeout_s)
            assert self._conn is not None
            self._conn.execute("SELECT 1")
        except (StoreError, psycopg.Error) as exc:
            failure.append(str(exc) if isinstance(exc, StoreError) else f"{where(self._dsn)}: {one_line(exc)}")
            self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def usable(conn: Optional[psycopg.Connection]) -> bool:
    """Whether an idle connection may still be used: open, and nothing waiting to be read on it
    (an idle connection the server closed, say on a restart, has its goodbye or EOF there: it is
    replaced before a write is sent into it and left in doubt)."""
    if conn is None or conn.closed or conn.broken:
        return False
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not readable


def shutdown(conn: Optional[psycopg.Connection]) -> None:
    """Shuts the connection's socket down under a thread blocked on it (which then fails)."""
    if conn is None or conn.closed:
        return
    try:
        sock = socket.fromfd(conn.pgconn.socket, socket.AF_UNIX, socket.SOCK_STREAM)
    except (OSError, psycopg.Error):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()
