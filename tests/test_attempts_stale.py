"""Attempts (issue 19 item 2): a replayed open_token of a superseded attempt is refused as stale
(FAILED_PRECONDITION naming the live attempt) and never supersedes it, also after a restart when
only the store knows the token; ``next_attempt`` never passes the 2^53 - 1 bound; and a job
resuming from a checkpoint past a quarantined attempt is told what works - its checkpoint's
snapshot, which the regulator then restores. Real gRPC servers on loopback with SQLite state."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.errors import DataLoss, FailedPrecondition
from regulator_service.edge.server import RegulatorServer, ServerConfig
from regulator_service.model import SessionConfig
from regulator_service.storage import codec
from regulator_service.storage.memory import MemoryStore
from regulator_service.storage.sqlite import STATE_FILE

from .conftest import roomy_limits

MODS = ["a", "b"]
PROFILE = pb.Profile(official=pb.OfficialProfile(history=2))
MAX_ATTEMPT = (1 << 53) - 1


def server(state: Path) -> RegulatorServer:
    return RegulatorServer(ServerConfig(port=0, metrics_port=None, state_dir=state, grace_seconds=1.0, limits=roomy_limits()))


def open_req(job: str, **fields: Any) -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(job_id=job, modalities=MODS, profile=PROFILE, **fields)


def report(client: RegulatorClient, job: str, attempt: int, epoch: int, step: int) -> pb.ReportResponse:
    stats = [pb.ModalityStats(modality="a", score_sum=3.0, fisher=1.0 + step * step),
             pb.ModalityStats(modality="b", score_sum=1.5, fisher=2.0)]
    return client.transport.report(pb.ReportRequest(job_id=job, attempt=attempt, epoch=epoch, step=step, count=4, stats=stats))


@pytest.mark.e2e
def test_a_replayed_open_token_of_a_superseded_attempt_is_refused_and_supersedes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with server(state) as srv, RegulatorClient.connect(srv.target, timeout=30) as client:
        t = client.transport
        assert t.open_session(open_req("job", next_attempt=True, open_token="pod-a")).session.attempt == 0
        assert t.open_session(open_req("job", next_attempt=True, open_token="pod-b")).session.attempt == 1
        report(client, "job", 1, 0, 0)
        with pytest.raises(FailedPrecondition, match=r"open_token 'pod-a'.*stale.*attempt 0.*attempt 1 is the live attempt"):
            t.open_session(open_req("job", next_attempt=True, open_token="pod-a"))
        live = client.get_session("job").session
        assert (live.attempt, live.state, live.steps) == (1, pb.SESSION_STATE_OPEN, 1)
        # the live opener's own retry still gets its attempt, and a new opener the next one
        assert not t.open_session(open_req("job", next_attempt=True, open_token="pod-b")).created
    with server(state) as srv, RegulatorClient.connect(srv.target, timeout=30) as client:
        t = client.transport  # restarted: memory holds nothing of attempt 0, the store knows its token
        with pytest.raises(FailedPrecondition, match=r"stale.*attempt 1 is the live attempt"):
            t.open_session(open_req("job", next_attempt=True, open_token="pod-a"))
        report(client, "job", 1, 0, 1)  # attempt 1 was never superseded
        assert client.get_session("job").session.attempt == 1
        assert t.open_session(open_req("job", next_attempt=True, open_token="pod-c")).session.attempt == 2
        with pytest.raises(FailedPrecondition, match=r"opened attempt 1.*attempt 2 is the live attempt"):
            t.open_session(open_req("job", next_attempt=True, open_token="pod-b"))
    conn = sqlite3.connect(state / STATE_FILE)
    try:
        assert conn.execute("SELECT attempt, status FROM sessions WHERE job_id='job' ORDER BY attempt").fetchall() == [
            (0, 3), (1, 3), (2, 1)]  # superseded, superseded (by pod-c), open: no attempt 3
    finally:
        conn.close()


@pytest.mark.e2e
def test_next_attempt_stays_within_the_documented_bound(tmp_path: Path) -> None:
    with server(tmp_path / "state") as srv, RegulatorClient.connect(srv.target, timeout=30) as client:
        t = client.transport
        assert t.open_session(open_req("job", attempt=MAX_ATTEMPT)).session.attempt == MAX_ATTEMPT
        for token in ("", "pod-x"):
            with pytest.raises(FailedPrecondition, match=r"no next attempt.*2\^53 - 1"):
                t.open_session(open_req("job", next_attempt=True, open_token=token))
        live = client.get_session("job").session
        assert (live.attempt, live.state) == (MAX_ATTEMPT, pb.SESSION_STATE_OPEN)


@pytest.mark.e2e
def test_a_job_resuming_past_a_quarantined_attempt_is_told_to_send_its_snapshot_and_is_restored_by_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with server(state) as srv, RegulatorClient.connect(srv.target, timeout=30) as client:
        info = client.transport.open_session(open_req("job", next_attempt=True)).session
        snap = pb.SessionSnapshot(modalities=MODS, profile=info.profile)
        for e in range(3):
            for s in range(3 * e, 3 * e + 3):
                report(client, "job", 0, e, s)
            snap.epochs.append(client.end_epoch("job", attempt=0, epoch=e).closed)
    conn = sqlite3.connect(state / STATE_FILE)
    (config,) = conn.execute("SELECT config FROM sessions WHERE job_id='job'").fetchone()
    conn.execute("UPDATE sessions SET config=? WHERE job_id='job'", (config.replace('"profile"', '"#rofile"', 1),))
    conn.commit()
    conn.close()
    with server(state) as srv, RegulatorClient.connect(srv.target, timeout=30) as client:
        t = client.transport
        with pytest.raises(DataLoss, match=r"cannot resume job 'job' at epoch 2.*regulation snapshot.*InfoRegHook.state_dict") as err:
            t.open_session(open_req("job", next_attempt=True, resume_epoch=2))
        assert "Open a new attempt" not in str(err.value)  # it is opening one: that advice misled
        resumed = t.open_session(open_req("job", next_attempt=True, resume_epoch=2,
                                          snapshot=pb.SessionSnapshot(modalities=MODS, profile=snap.profile, epochs=snap.epochs[:2])))
        assert (resumed.created, resumed.session.attempt, resumed.session.epoch) == (True, 1, 2)
        assert list(resumed.session.window) == [m.window for m in snap.epochs[2].modalities]  # as the lost attempt had it
        assert [e.restored for e in client.get_session("job").epochs] == [True, True, False]
        with pytest.raises(DataLoss, match=r"quarantined.*Open a new attempt.*regulation snapshot"):
            client.get_session("job", attempt=0)


def test_the_default_token_lookup_reads_every_attempt() -> None:
    """A store without its own query (the memory store) finds the token by reading the attempts."""
    store = MemoryStore()
    profile = codec.profile_from_dict({"name": "none"})
    for attempt, token in enumerate(("p0", "p1", "")):
        store.create_session(SessionConfig("j", attempt, 1, ("a", "b"), profile, open_token=token), 0, ())
    assert [store.attempt_opened_by("j", t) for t in ("p0", "p1", "p9")] == [0, 1, None]
    assert store.attempt_opened_by("other", "p0") is None
