"""Start and stop a ``regulator serve`` subprocess (the demo, examples, end-to-end tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence


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
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "regulator_cli", "serve",
            "--port", str(self.requested_port), "--metrics-port", "0", "--ready-file", str(ready),
        ]
        cmd += ["--state-dir", self.state_dir] if self.state_dir else ["--in-memory"]
        cmd += self.extra_args
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # type: ignore[assignment]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"regulator exited with code {self.proc.returncode} before serving: {' '.join(cmd)}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"regulator did not serve within {timeout}s")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
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
