"""A throwaway PostgreSQL cluster for ``bench.server_load --servers postgresql``: ``initdb`` into a
temporary directory, served on a Unix socket there (no TCP port), pinned to the server's CPUs so
that the regulator and its database share one core as SQLite does, and removed afterwards.

Its CPU time is part of what a Report costs with this store: ``cpu_seconds`` sums the postmaster
and its children (the regulator's connections live as long as the server, so their backends are
counted from one cell to the next).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

SUPERUSER = "postgres"


def bindir() -> Optional[Path]:
    """The PostgreSQL server binaries (``initdb`` on PATH, else the newest Debian install)."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((c for c in candidates if (c / "initdb").exists() and (c / "pg_ctl").exists()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """``start()`` -> a DSN; ``stop()`` removes everything. As root, the server runs as the
    ``postgres`` user (initdb refuses root)."""

    def __init__(self, cpus: Sequence[int]) -> None:
        found = bindir()
        if found is None:
            raise RuntimeError("PostgreSQL is not installed (initdb, pg_ctl): apt-get install postgresql, or `make tools`")
        self.bindir = found
        self.cpus = list(cpus)
        self.root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        self.port = _free_port()
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam(SUPERUSER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._run_as = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]

    def _run(self, *argv: str) -> None:
        pin = ["taskset", "-c", ",".join(map(str, self.cpus))] if shutil.which("taskset") else []
        done = subprocess.run([*pin, *self._run_as, *argv], capture_output=True, text=True, timeout=180, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> str:
        data = self.root / "data"
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                  "--locale=C")
        # durable as a production server is by default (fsync on): the store's commits are what is measured
        options = f"-k {self.root} -p {self.port} -c listen_addresses=''"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.root / "server.log"), "-w", "-t", "120",
                  "-o", options, "start")
        return f"postgresql://{SUPERUSER}@/postgres?host={self.root}&port={self.port}"

    def postmaster_pid(self) -> Optional[int]:
        try:
            return int((self.root / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its children (one level: the postmaster's backends and helpers)."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            pids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return pids
