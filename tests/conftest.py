"""Shared fixtures: real servers on loopback (in-thread and as a subprocess), fixture paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from regulator_client import RegulatorClient
from regulator_service.server import RegulatorServer, ServerConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FIXTURES = ROOT / "tests" / "fixtures"


def data_file(name: str) -> Path:
    """A trace from ../shared/data, else the copy committed under tests/fixtures."""
    for base in (SHARED_DATA, FIXTURES):
        if (base / name).exists():
            return base / name
    pytest.skip(f"trace {name} not found in {SHARED_DATA} or {FIXTURES}")


def require_promtool() -> str:
    """promtool (Debian package `prometheus`; `make test` installs it when run as root)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not on PATH. Install it (Debian/Ubuntu): "
            "apt-get update && apt-get install -y --no-install-recommends prometheus"
        )
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RegulatorServer]:
    """A real gRPC regulator on a free loopback port with its SQLite state in tmp_path."""
    srv = RegulatorServer(ServerConfig(port=0, metrics_port=None, state_dir=tmp_path / "state", grace_seconds=1.0))
    srv.start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def client(server: RegulatorServer) -> Iterator[RegulatorClient]:
    with RegulatorClient.connect(server.target, timeout=5.0) as c:
        yield c


class RecordingTransport:
    """Wraps a transport and records every Report and EndEpoch call the hook makes: the
    request's step, the deadline and wait_for_ready it was sent with, whether it failed, and
    ``current`` (set by the test: the training step in progress). Lets tests assert "a step never
    waits longer than one deadline" structurally (gRPC enforces the deadline), not with a clock."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[dict[str, Any]] = []
        self.current = 0

    def _record(self, method: str, req: Any, call: dict[str, Any]) -> Any:
        entry = {"method": method, "during": self.current, "step": getattr(req, "step", None),
                 "fallback": getattr(req, "fallback", 0), "timeout": call.get("timeout"),
                 "wait_for_ready": call.get("wait_for_ready"), "error": None}
        self.calls.append(entry)
        try:
            return getattr(self.inner, method)(req, **call)
        except Exception as exc:
            entry["error"] = type(exc).__name__
            raise

    def report(self, req: Any, **call: Any) -> Any:
        return self._record("report", req, call)

    def end_epoch(self, req: Any, **call: Any) -> Any:
        return self._record("end_epoch", req, call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def scrape(metrics_port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()


def wait_until(predicate: Any, what: str, timeout: float = 60.0) -> None:
    """Polls ``predicate`` (a liveness bound for a slow machine, not a performance threshold)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting until {what}")
        time.sleep(0.02)
