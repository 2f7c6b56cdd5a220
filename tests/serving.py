"""A real ``regulator serve`` process for the tests, with what its ``--ready-file`` says."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from trainers.serverproc import launch, regulator_command


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    metrics_port: Optional[int]
    health_port: Optional[int]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        """Resident set size of the server process, from /proc (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/PID/status")

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str, env: Optional[dict[str, str]] = None) -> Iterator[Served]:
    """``regulator serve --port 0 --in-memory ARGS`` until the block ends (then SIGTERM, exit 0)."""
    name = uuid.uuid4().hex[:8]
    ready, log = tmp_path / f"ready-{name}.json", tmp_path / f"server-{name}.log"
    cmd = regulator_command(ready, "--in-memory", *args)
    with open(log, "wb") as out:
        try:
            proc, info = launch(cmd, ready, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}:\n{log.read_text()}") from None
    try:
        yield Served(proc, log, info["port"], info["metrics_port"], info["health_port"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
