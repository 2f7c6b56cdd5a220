"""A bad record hurts only its session (issue 8, item 4): one flipped byte in a stored record
quarantines that session (listed CORRUPT with the reason, DATA_LOSS on its RPCs, its rows
byte-identical) while the server starts and serves every other session. Real `regulator serve`
processes, a real SQLite file."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.errors import DataLoss
from regulator_service.storage.sqlite import STATE_FILE
from trainers.serverproc import ServerProcess

from .conftest import health

pytestmark = pytest.mark.e2e


def feed(client: RegulatorClient, job: str, steps: int, epoch_every: int = 5) -> None:
    client.open_session(job, ["a", "b"], "official")
    for step in range(steps):
        client.report(job, attempt=0, epoch=step // epoch_every, step=step, count=8,
                      score_sums={"a": 4.0 + step % 3, "b": 2.0}, fisher={"a": 0.1, "b": 0.2 + step})
        if step % epoch_every == epoch_every - 1:
            client.end_epoch(job, attempt=0, epoch=step // epoch_every)


def rows(state: Path, job: str) -> list[Any]:
    """Every stored row of a job, exactly as stored."""
    conn = sqlite3.connect(state / STATE_FILE)
    try:
        return [
            conn.execute(f"SELECT * FROM {table} WHERE job_id=? ORDER BY 1, 2, 3", (job,)).fetchall()
            for table in ("sessions", "epochs", "steps")
        ]
    finally:
        conn.close()


def flip(state: Path, sql: str, column: str, old: str, new: str, *args: object) -> None:
    """Changes one byte of one stored JSON record, as a bad sector or a stray write would
    (still valid SQLite: quick_check passes)."""
    assert len(old) == len(new)
    conn = sqlite3.connect(state / STATE_FILE)
    (text,) = conn.execute(f"SELECT {column} FROM {sql}", args).fetchone()
    assert old in text
    conn.execute(f"UPDATE {sql.split(' WHERE ')[0]} SET {column}=? WHERE {sql.split(' WHERE ')[1]}",
                 (text.replace(old, new, 1), *args))
    conn.commit()
    conn.close()


def test_a_session_whose_config_does_not_decode_is_quarantined_and_the_others_serve(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "server.log"
    with ServerProcess(str(state)) as server:
        with RegulatorClient.connect(server.target, timeout=10) as client:
            feed(client, "good", 12)
            feed(client, "bad", 12)
            before_good = client.get_session("good", include_steps=True)
    flip(state, "sessions WHERE job_id=?", "config", '"profile"', '"#rofile"', "bad")
    bad_rows = rows(state, "bad")

    with ServerProcess(str(state), log_path=str(log)) as server:  # starts: no traceback, no exit
        assert health(server.target) == health_pb2.HealthCheckResponse.SERVING
        with RegulatorClient.connect(server.target, timeout=10) as client:
            listed = {s.job_id: s for s in client.list_sessions()}
            assert listed["bad"].state == pb.SESSION_STATE_CORRUPT
            assert "cannot be decoded" in listed["bad"].state_reason and "profile" in listed["bad"].state_reason
            assert listed["good"].state == pb.SESSION_STATE_OPEN
            for call in (
                lambda: client.get_session("bad"),
                lambda: client.report("bad", attempt=0, epoch=2, step=12, count=8, score_sums={"a": 1.0, "b": 1.0},
                                      fisher={"a": 0.1, "b": 0.1}),
                lambda: client.end_epoch("bad", attempt=0, epoch=2),
                lambda: client.close_session("bad", attempt=0),
                lambda: client.open_session("bad", ["a", "b"], "official"),
            ):
                with pytest.raises(DataLoss, match="quarantined"):
                    call()
            # every other session is served as before ...
            assert client.get_session("good", include_steps=True) == before_good
            client.report("good", attempt=0, epoch=2, step=12, count=8, score_sums={"a": 1.0, "b": 1.0},
                          fisher={"a": 0.1, "b": 0.1})
            # ... and the quarantined job goes on under a new attempt, beside the untouched rows
            client.open_session("bad", ["a", "b"], "official", attempt=1)
            client.report("bad", attempt=1, epoch=0, step=0, count=8, score_sums={"a": 1.0, "b": 1.0},
                          fisher={"a": 0.1, "b": 0.1})
            assert client.get_session("bad").session.attempt == 1
        listed = subprocess.run([sys.executable, "-m", "regulator_cli", "sessions"], capture_output=True, text=True,
                                timeout=120, env={**os.environ, "REGULATOR_TARGET": server.target})
        assert listed.returncode == 0, listed.stderr
        assert "bad attempt 0 is corrupt: its stored records cannot be decoded" in listed.stdout
    assert "quarantined session bad#0" in log.read_text()
    after = rows(state, "bad")
    assert [r for r in after[0] if r[1] == 0] == bad_rows[0]  # attempt 0's rows, byte for byte
    assert [r for r in after[1] if r[1] == 0] == bad_rows[1]
    assert [r for r in after[2] if r[1] == 0] == bad_rows[2]


def test_a_step_record_that_does_not_decode_quarantines_its_session_when_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with ServerProcess(str(state)) as server:
        with RegulatorClient.connect(server.target, timeout=10) as client:
            feed(client, "good", 12)
            feed(client, "lazy", 12)
            client.close_session("lazy", attempt=0)  # not loaded at start: read when asked for
    flip(state, "steps WHERE job_id=? AND step=3", "record", '"count"', '"#ount"', "lazy")
    lazy_rows = rows(state, "lazy")

    with ServerProcess(str(state)) as server:
        assert health(server.target) == health_pb2.HealthCheckResponse.SERVING
        with RegulatorClient.connect(server.target, timeout=10) as client:
            assert client.get_session("lazy").session.state == pb.SESSION_STATE_CLOSED  # header and epochs decode
            with pytest.raises(DataLoss, match="step 3"):
                client.get_session("lazy", include_steps=True)
            listed = {(s.job_id, s.attempt): s for s in client.list_sessions(include_inactive=True)}
            assert listed[("lazy", 0)].state == pb.SESSION_STATE_CORRUPT
            assert "step 3" in listed[("lazy", 0)].state_reason
            with pytest.raises(DataLoss):
                client.get_session("lazy")
            assert len(client.get_session("good", include_steps=True).steps) == 12
            client.report("good", attempt=0, epoch=2, step=12, count=8, score_sums={"a": 1.0, "b": 1.0},
                          fisher={"a": 0.1, "b": 0.1})
    assert rows(state, "lazy") == lazy_rows
