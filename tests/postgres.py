"""A throwaway PostgreSQL cluster for the tests: ``initdb`` into a temporary directory, served on
a Unix socket in that directory (no TCP port, nothing reachable from outside), stopped and removed
at the end of the session. Tests share one cluster and get a fresh database each (``pg_dsn``).

initdb refuses to run as root: as root (our machines, a fresh CI machine) the cluster runs as the
``postgres`` user the Debian package creates. Without PostgreSQL the fixtures skip, except under
CI (``CI=true``), where they fail: `make tools` installs it there.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

SUPERUSER = "postgres"


def _bindir() -> Optional[Path]:
    """The PostgreSQL server binaries: ``pg_config --bindir``, else the newest Debian install."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(debian)]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    return next((c for c in candidates if (c / "initdb").exists() and (c / "pg_ctl").exists()), None)


def _missing(why: str) -> None:
    message = f"PostgreSQL is not usable here ({why}); install it: apt-get install -y postgresql (or `make tools`)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


class PgCluster:
    """One PostgreSQL server on a Unix socket in ``root``; ``start``/``stop`` for fault tests."""

    def __init__(self, bindir: Path, root: Path, port: int, run_as: list[str]) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.port = port
        self._run_as = run_as
        self._dbs = itertools.count()

    def _run(self, *argv: str) -> None:
        out = subprocess.run([*self._run_as, *argv], capture_output=True, text=True, timeout=120, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
            "--no-sync", "--encoding=UTF8", "--locale=C",
        )

    def start(self) -> None:
        # fsync off: the tests kill regulators, never this server, and a loaded machine is slow enough
        options = f"-k {self.root} -p {self.port} -c listen_addresses='' -c fsync=off -c full_page_writes=off -c max_connections=200"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "120", "-o", options, "start")

    def stop(self) -> None:
        """Stops the server at once (as a crash would): clients see their connections drop."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.root}&port={self.port}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its DSN."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._dbs)}"
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=30) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_cluster() -> Iterator[PgCluster]:
    """Starts a cluster (skips or fails as the module docstring says), yields it, removes it."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("the Python package psycopg is not installed: pip install 'psycopg[binary]'")
    bindir = _bindir()
    if bindir is None:
        _missing("initdb and pg_ctl not found")
    assert bindir is not None
    run_as: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="regulator-pg-"))
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam(SUPERUSER)
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            _missing(f"running as root and there is no {SUPERUSER!r} user to run initdb as")
            raise AssertionError("unreachable")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]
    from .conftest import free_port

    cluster = PgCluster(bindir, root, free_port(), run_as)
    try:
        cluster.init()
        cluster.start()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start a throwaway PostgreSQL: {exc}\n{cluster.log_tail()}")
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # stopped by the test already
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's PostgreSQL cluster (started on first use)."""
    yield from start_cluster()


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> str:
    """The DSN of a fresh database of the shared cluster (one per test)."""
    return pg_cluster.new_database()


class Stores:
    """Opens the store of one backend (``sqlite``, ``memory``, ``postgresql``) again and again
    on the same state, as a restarted server would (memory: the same store)."""

    def __init__(self, backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.backend = backend
        self._tmp_path = tmp_path
        self._dsn = request.getfixturevalue("pg_dsn") if backend == "postgresql" else ""
        self._memory: Any = None

    def open(self, **kwargs: Any) -> Any:
        if self.backend == "sqlite":
            from regulator_service.storage import SQLiteStore

            return SQLiteStore(self._tmp_path, **kwargs)
        if self.backend == "postgresql":
            from regulator_service.storage.postgresql import PostgreSQLStore

            return PostgreSQLStore(self._dsn, **kwargs)
        from regulator_service.storage import MemoryStore

        if self._memory is None:
            self._memory = MemoryStore()
        return self._memory


@pytest.fixture(params=["sqlite", "memory", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    """Every store backend in turn (PostgreSQL: a fresh database of the shared cluster)."""
    return Stores(request.param, request, tmp_path)
