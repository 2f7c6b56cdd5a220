"""Start and stop a ``regulator serve`` subprocess (the demo, examples, end-to-end tests).

``launch`` is the one way this repository starts a regulator (or any server that writes a ready
file) and waits until it serves: ``ServerProcess`` here, ``tests/serving.py`` and
``bench/server_load.py`` use it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

READY_POLL_S = 0.05


def wait_ready(proc: "subprocess.Popen[bytes]", ready: Path, timeout: float, what: str = "regulator") -> dict[str, Any]:
    """The JSON ``proc`` writes to ``ready`` once it serves (``serve --ready-file``: port,
    metrics_port, health_port, pid). RuntimeError if it exits first, TimeoutError past ``timeout``."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before serving")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not serve within {timeout:g}s")
        time.sleep(READY_POLL_S)
    return json.loads(ready.read_text())


def launch(
    cmd: Sequence[str], ready: Path, timeout: float = 60.0, what: str = "regulator", **popen: Any
) -> tuple["subprocess.Popen[bytes]", dict[str, Any]]:
    """Starts ``cmd`` (``popen``: ``subprocess.Popen``'s keywords) and waits until it writes
    ``ready``; a process that does not get there is terminated (SIGTERM, then SIGKILL)."""
    ready.unlink(missing_ok=True)
    proc: subprocess.Popen[bytes] = subprocess.Popen(list(cmd), **popen)
    try:
        return proc, wait_ready(proc, ready, timeout, what)
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def regulator_command(ready: Path, *args: str) -> list[str]:
    """``regulator serve --port 0 --ready-file READY ARGS`` in this interpreter."""
    return [sys.executable, "-m", "regulator_cli", "serve", "--port", "0", "--ready-file", str(ready), *args]


class ServerProcess:
    """``regulator serve --port 0`` in a child process; ``target`` is known once it serves."""

    def __init__(
        self,
        state_dir: Optional[str] = None,
        extra_args: Sequence[str] = (),
        log_path: Optional[str] = None,
        port: int = 0,
    ) -> None:
        self.state_dir = state_dir
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.requested_port = port
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self._tmp = tempfile.TemporaryDirectory(prefix="regulator-")
        self._log = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        ready = Path(self._tmp.name) / "ready.json"
        cmd = regulator_command(ready, "--metrics-port", "0")
        cmd[cmd.index("--port") + 1] = str(self.requested_port)
        cmd += ["--state-dir", self.state_dir] if self.state_dir else ["--in-memory"]
        cmd += self.extra_args
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # type: ignore[assignment]
        try:
            self.proc, info = launch(cmd, ready, timeout, stdout=self._log, stderr=self._log)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {' '.join(cmd)}") from None
        self.port, self.metrics_port = info["port"], info["metrics_port"]
        return self

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM, wait for the graceful drain; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()  # type: ignore[union-attr]
        return code

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._tmp.cleanup()
