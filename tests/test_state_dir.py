"""One server per state directory; a state file that is removed, replaced or empty is never used
silently (issue 8, item 2). Real `regulator serve` processes, real files."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from regulator_client import RegulatorClient
from regulator_client.errors import Unavailable
from regulator_service.storage.sqlite import STATE_FILE
from trainers.serverproc import ServerProcess

from .conftest import health, wait_until

pytestmark = pytest.mark.e2e


def serve(state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "regulator_cli", "serve", "--port", "0", "--metrics-port", "-1", "--state-dir", str(state), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def report(client: RegulatorClient, step: int, job: str = "job") -> None:
    client.report(job, attempt=0, epoch=0, step=step, count=8, score_sums={"a": 4.0, "b": 2.0}, fisher={"a": 0.1, "b": 0.2})


def test_a_second_server_on_the_same_state_dir_exits_with_one_line_naming_the_dir_and_the_holder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with ServerProcess(str(state)) as first:
        assert first.proc is not None
        second = serve(state)
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert str(state) in lines[0] and f"pid {first.proc.pid}" in lines[0], lines[0]
        assert "regulator serving" not in second.stdout
        with RegulatorClient.connect(first.target, timeout=10) as client:  # the first one is untouched
            client.open_session("job", ["a", "b"], "official")
            report(client, 0)
            assert client.get_session("job").session.steps == 1
    # once it is gone the directory is free again, also after a kill -9 (flock dies with the process)
    crashed = ServerProcess(str(state)).start()
    crashed.kill()
    with ServerProcess(str(state)) as again:
        with RegulatorClient.connect(again.target, timeout=10) as client:
            assert client.get_session("job").session.steps == 1


def test_a_state_file_removed_while_serving_stops_writes_and_health(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "server.log"
    with ServerProcess(str(state), log_path=str(log)) as server:
        with RegulatorClient.connect(server.target, timeout=10) as client:
            client.open_session("job", ["a", "b"], "official")
            report(client, 0)
            (state / STATE_FILE).unlink()
            with pytest.raises(Unavailable, match="was removed while the server was running"):
                report(client, 1)
            with pytest.raises(Unavailable, match="was removed"):
                client.open_session("another", ["a", "b"], "none")
            wait_until(lambda: health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING, "health is NOT_SERVING")
            assert client.get_session("job").session.steps == 1  # the failed step changed nothing
    assert "was removed while the server was running" in log.read_text()
    assert not (state / STATE_FILE).exists()  # nothing quietly made a new, empty one


def test_a_state_file_replaced_while_serving_stops_writes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with ServerProcess(str(state)) as server:
        with RegulatorClient.connect(server.target, timeout=10) as client:
            client.open_session("job", ["a", "b"], "official")
            report(client, 0)
            copy = tmp_path / "copy.sqlite3"
            shutil.copyfile(state / STATE_FILE, copy)
            os.replace(copy, state / STATE_FILE)  # e.g. a backup restored under a live server
            with pytest.raises(Unavailable, match="was replaced while the server was running"):
                report(client, 1)
            wait_until(lambda: health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING, "health is NOT_SERVING")


def test_an_empty_state_file_is_refused_like_a_corrupt_one(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "server.log"
    state.mkdir()
    (state / STATE_FILE).write_bytes(b"")
    with ServerProcess(str(state), log_path=str(log)) as server:
        assert health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with RegulatorClient.connect(server.target, timeout=10) as client:
            with pytest.raises(Unavailable, match="empty"):
                client.list_sessions()
    assert (state / STATE_FILE).read_bytes() == b""  # never treated as a new database
    assert "is empty (0 bytes)" in log.read_text()


def test_a_new_state_file_never_replays_the_wal_of_a_removed_one(tmp_path: Path) -> None:
    """A removed state file leaves its -wal behind while the old server runs; the next server
    must start afresh, not apply those pages to a new database."""
    state = tmp_path / "state"
    server = ServerProcess(str(state)).start()
    with RegulatorClient.connect(server.target, timeout=10) as client:
        client.open_session("job", ["a", "b"], "official")
        for step in range(50):
            report(client, step)
    (state / STATE_FILE).unlink()
    server.kill()  # and then it crashed: its WAL stays behind
    assert Path(f"{state / STATE_FILE}-wal").stat().st_size > 0
    with ServerProcess(str(state)) as again:
        assert health(again.target) == health_pb2.HealthCheckResponse.SERVING
        with RegulatorClient.connect(again.target, timeout=10) as client:
            assert client.list_sessions(include_inactive=True) == []
    conn = sqlite3.connect(state / STATE_FILE)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert [p.name for p in state.glob(f"{STATE_FILE}-wal.orphaned-*")]  # kept aside, not deleted


def test_a_state_dir_that_is_a_file_is_one_line_saying_so(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")
    result = serve(state)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"state dir {state} is not a directory" in lines[0], result.stderr
    assert state.read_text() == "not a directory"  # left alone
