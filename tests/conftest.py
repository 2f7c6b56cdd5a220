"""Shared fixtures and probes: real servers on loopback (in-thread and as a subprocess), fixture
paths, health and /metrics probes, polling with a liveness bound."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from regulator_client import RegulatorClient
from regulator_service.model import Limits
from regulator_service.edge.server import SERVICE_NAME, RegulatorServer, ServerConfig

from .postgres import pg_cluster, pg_dsn, stores  # noqa: F401  (a throwaway PostgreSQL, one database per test)

ROOT = Path(__file__).resolve().parents[1]
# The traces the docs' examples and the tests use ship with the repository.
TRACES = ROOT / "examples" / "traces"

# Every store call, and every wait for a busy session, is bounded by --store-timeout (default 2 s;
# past it the call is UNAVAILABLE). On a loaded 2-core machine a plain read or commit can take
# longer than that, so the test servers that do not test the timeout get a liveness bound
# instead: in-thread servers through ``roomy_limits()``, `regulator serve` processes through
# REGULATOR_STORE_TIMEOUT (set for every test below; a test of the timeout passes
# --store-timeout, which wins).
STORE_TIMEOUT_S = 30.0


def roomy_limits(**overrides: Any) -> Limits:
    """Limits for an in-thread test server: the defaults, with a generous store timeout."""
    return Limits(**{"store_timeout_s": STORE_TIMEOUT_S, **overrides})


@pytest.fixture(autouse=True)
def _roomy_store_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGULATOR_STORE_TIMEOUT", str(STORE_TIMEOUT_S))


def data_file(name: str) -> Path:
    """A trace shipped under examples/traces (missing is a failure, never a skip)."""
    path = TRACES / name
    assert path.exists(), f"trace {name} not found in {TRACES}"
    return path


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
    srv = RegulatorServer(ServerConfig(port=0, metrics_port=None, state_dir=tmp_path / "state", grace_seconds=1.0, limits=roomy_limits()))
    srv.start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def client(server: RegulatorServer) -> Iterator[RegulatorClient]:
    with RegulatorClient.connect(server.target, timeout=30.0) as c:  # a liveness bound
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

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as resp:
        return resp.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample (exactly these labels) in a /metrics exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"{name}{labels} not exported")


def health(target: str, service: str = SERVICE_NAME) -> int:
    """The serving status a health Check of ``service`` answers (a kubelet probe's question)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status


def free_port() -> int:
    """A loopback port free right now, for a program that must be told its port (Prometheus, a
    torchrun rendezvous); it may be taken before that program binds it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, what: str, timeout: float = 60.0) -> None:
    """Polls ``predicate`` (a liveness bound for a slow machine, not a performance threshold)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting until {what}")
        time.sleep(0.02)
