"""Shared fixtures: real servers on loopback (in-thread and as a subprocess), fixture paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

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
