"""One server per state directory: an exclusive ``flock`` on ``<state dir>/regulator.lock``.

Two servers writing one SQLite file corrupt each other's history (each keeps its sessions in
memory and trusts it), so the lock is held for the server's whole lifetime. ``flock`` belongs to
the open file: it goes away with the process, also on kill -9, so a crashed server never leaves
a stale lock behind. The holder writes its PID into the file for the refusal message.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Optional

from .base import StateDirLocked, StoreError

LOCK_FILE = "regulator.lock"


class StateDirLock:
    """Held from ``acquire`` until ``release`` (or the process's end)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: Optional[int] = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> "StateDirLock":
        """The lock of ``state_dir``; ``StateDirLocked`` if another process (or another store
        of this process) holds it."""
        path = Path(state_dir) / LOCK_FILE
        if Path(state_dir).exists() and not Path(state_dir).is_dir():
            raise StoreError(f"state dir {Path(state_dir)} is not a directory")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(_unwritable(Path(state_dir), path, exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            holder = f" (pid {pid})" if pid is not None else ""
            raise StateDirLocked(
                f"state dir {Path(state_dir)} is in use by another regulator{holder}; "
                "stop it or give this one another --state-dir",
                pid,
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _unwritable(state_dir: Path, path: Path, exc: OSError) -> str:
    """Why the server cannot start on ``state_dir``, in one line. A read-only state directory
    is refused, not served read-only: every answer is committed there before it is sent, so a
    server that cannot write would answer nothing but UNAVAILABLE (to read a read-only state,
    copy the directory somewhere writable and serve the copy)."""
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "is on a read-only file system" if exc.errno == errno.EROFS else f"is not writable by uid {os.getuid()}"
        return (
            f"state dir {state_dir} {why}: the regulator commits every answer there before sending it, "
            "so it needs a writable --state-dir (to read this state, copy the directory somewhere writable "
            "and serve the copy)"
        )
    return f"cannot create the lock file {path}: {exc.strerror or exc}"
