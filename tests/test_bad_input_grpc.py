"""Bad input over real gRPC: the right status code, and the session's history byte-identical."""

from __future__ import annotations

import math
from typing import Any, Callable

import grpc
import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from regulator_client import RegulatorClient
from regulator_service.edge.server import RegulatorServer

JOB = "bad-input-job"


@pytest.fixture
def stub(server: RegulatorServer) -> pb_grpc.RegulatorStub:
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.RegulatorStub(channel)
    channel.close()


def stats(a: float = 30.0, b: float = 20.0, fa: float = 1e-3, fb: float = 2e-3) -> list[pb.ModalityStats]:
    return [pb.ModalityStats(modality="audio", score_sum=a, fisher=fa), pb.ModalityStats(modality="visual", score_sum=b, fisher=fb)]


def report(**kw: Any) -> pb.ReportRequest:
    base = dict(job_id=JOB, attempt=1, rank=0, epoch=1, step=30, count=64, stats=stats())
    base.update(kw)
    return pb.ReportRequest(**base)


def snapshot(stub: pb_grpc.RegulatorStub) -> bytes:
    return stub.GetSession(pb.GetSessionRequest(job_id=JOB, include_steps=True), timeout=30).SerializeToString(deterministic=True)


@pytest.fixture
def history(client: RegulatorClient, stub: pb_grpc.RegulatorStub) -> bytes:
    """A session at attempt 1 with two closed epochs and steps 0..29 (epoch 1 open)."""
    client.open_session(JOB, ["audio", "visual"], "official", attempt=1, world_size=2)
    step = 0
    for epoch in range(2):
        for _ in range(15):
            stub.Report(report(epoch=epoch, step=step, stats=stats(30 + step % 3, 20 + step % 5)), timeout=30)
            step += 1
        if epoch == 0:
            client.end_epoch(JOB, attempt=1, epoch=0)
    return snapshot(stub)


BAD: list[tuple[str, Callable[[], Any], grpc.StatusCode]] = [
    ("nan score", lambda: report(stats=stats(a=math.nan)), grpc.StatusCode.INVALID_ARGUMENT),
    ("inf fisher", lambda: report(stats=stats(fa=math.inf)), grpc.StatusCode.INVALID_ARGUMENT),
    ("negative fisher", lambda: report(stats=stats(fb=-1e-3)), grpc.StatusCode.INVALID_ARGUMENT),
    ("negative score", lambda: report(stats=stats(a=-1.0)), grpc.StatusCode.INVALID_ARGUMENT),
    ("score above count", lambda: report(stats=stats(a=65.0)), grpc.StatusCode.INVALID_ARGUMENT),
    ("count zero", lambda: report(count=0), grpc.StatusCode.INVALID_ARGUMENT),
    ("negative count", lambda: report(count=-5), grpc.StatusCode.INVALID_ARGUMENT),
    ("negative step", lambda: report(step=-1), grpc.StatusCode.INVALID_ARGUMENT),
    ("rank outside world", lambda: report(rank=2), grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown modality", lambda: report(stats=[*stats()[:1], pb.ModalityStats(modality="text", score_sum=1, fisher=1)]), grpc.StatusCode.INVALID_ARGUMENT),
    ("missing modality", lambda: report(stats=stats()[:1]), grpc.StatusCode.INVALID_ARGUMENT),
    ("duplicate modality", lambda: report(stats=[*stats(), stats()[0]]), grpc.StatusCode.INVALID_ARGUMENT),
    ("no fisher", lambda: report(stats=[pb.ModalityStats(modality="audio", score_sum=1), stats()[1]]), grpc.StatusCode.INVALID_ARGUMENT),
    ("negative fisher term", lambda: report(stats=[pb.ModalityStats(modality="audio", score_sum=1, fisher_terms=pb.FisherTerms(grad_sq=-1)), stats()[1]]), grpc.StatusCode.INVALID_ARGUMENT),
    ("applied without fallback", lambda: report(stats=[pb.ModalityStats(modality="audio", score_sum=1, fisher=1, applied=pb.Factors(proximal=1)), stats()[1]]), grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown fallback", lambda: report(fallback=9), grpc.StatusCode.INVALID_ARGUMENT),
    ("empty job id", lambda: report(job_id=""), grpc.StatusCode.INVALID_ARGUMENT),
    ("unicode job id", lambda: report(job_id="jöb\u202e"), grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown job", lambda: report(job_id="no-such-job"), grpc.StatusCode.NOT_FOUND),
    ("stale attempt", lambda: report(attempt=0), grpc.StatusCode.FAILED_PRECONDITION),
    ("attempt never opened", lambda: report(attempt=2), grpc.StatusCode.NOT_FOUND),
    ("conflicting duplicate step", lambda: report(step=3, epoch=0, stats=stats(a=1.0)), grpc.StatusCode.ALREADY_EXISTS),
    ("conflicting duplicate of last step", lambda: report(step=29, stats=stats(a=2.0)), grpc.StatusCode.ALREADY_EXISTS),
    ("epoch not open", lambda: report(epoch=3), grpc.StatusCode.FAILED_PRECONDITION),
    ("epoch already closed", lambda: report(epoch=0), grpc.StatusCode.FAILED_PRECONDITION),
]


@pytest.mark.parametrize("name,make,code", BAD, ids=[b[0] for b in BAD])
def test_bad_report_rejected_and_history_unchanged(
    history: bytes, stub: pb_grpc.RegulatorStub, name: str, make: Callable[[], Any], code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Report(make(), timeout=30)
    assert info.value.code() == code, info.value.details()
    assert info.value.details()  # a clear message, never empty
    assert snapshot(stub) == history


def test_gap_then_backwards_step_is_failed_precondition(history: bytes, stub: pb_grpc.RegulatorStub) -> None:
    stub.Report(report(step=40), timeout=30)  # steps may skip forward ...
    before = snapshot(stub)
    with pytest.raises(grpc.RpcError) as info:  # ... but never go back to an unrecorded step
        stub.Report(report(step=35), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert snapshot(stub) == before


def test_duplicate_report_gets_stored_answer_and_is_not_counted(history: bytes, stub: pb_grpc.RegulatorStub) -> None:
    first = stub.Report(report(step=30), timeout=30)
    after_first = snapshot(stub)
    again = stub.Report(report(step=30, rank=1), timeout=30)  # another rank, same statistics
    assert again.duplicate and not first.duplicate
    assert again.step == first.step
    assert snapshot(stub) == after_first


BAD_OTHER: list[tuple[str, str, Callable[[], Any], grpc.StatusCode]] = [
    ("open: one modality", "OpenSession", lambda: pb.OpenSessionRequest(job_id="x", modalities=["a"]), grpc.StatusCode.INVALID_ARGUMENT),
    ("open: duplicate modality", "OpenSession", lambda: pb.OpenSessionRequest(job_id="x", modalities=["a", "a"]), grpc.StatusCode.INVALID_ARGUMENT),
    ("open: bad modality name", "OpenSession", lambda: pb.OpenSessionRequest(job_id="x", modalities=["a", "b c"]), grpc.StatusCode.INVALID_ARGUMENT),
    ("open: too many modalities", "OpenSession", lambda: pb.OpenSessionRequest(job_id="x", modalities=[f"m{i}" for i in range(5000)]), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("open: official with 3", "OpenSession", lambda: pb.OpenSessionRequest(job_id="x", modalities=["a", "b", "c"], profile=pb.Profile(official=pb.OfficialProfile())), grpc.StatusCode.INVALID_ARGUMENT),
    ("open: unknown reference", "OpenSession", lambda: pb.OpenSessionRequest(job_id="x", modalities=["a", "b"], profile=pb.Profile(official=pb.OfficialProfile(reference_modality="c"))), grpc.StatusCode.INVALID_ARGUMENT),
    ("open: nan beta", "OpenSession", lambda: pb.OpenSessionRequest(job_id="x", modalities=["a", "b"], profile=pb.Profile(paper=pb.PaperProfile(beta=math.nan))), grpc.StatusCode.INVALID_ARGUMENT),
    ("open: beta above its bound", "OpenSession", lambda: pb.OpenSessionRequest(job_id="x", modalities=["a", "b"], profile=pb.Profile(paper=pb.PaperProfile(beta=1e308))), grpc.StatusCode.INVALID_ARGUMENT),
    ("open: gain above its bound", "OpenSession", lambda: pb.OpenSessionRequest(job_id="x", modalities=["a", "b"], profile=pb.Profile(official=pb.OfficialProfile(other_gain=101.0))), grpc.StatusCode.INVALID_ARGUMENT),
    ("report: 50,000-character modality", "Report", lambda: report(stats=[*stats()[:1], pb.ModalityStats(modality="x" * 50_000, score_sum=1, fisher=1)]), grpc.StatusCode.INVALID_ARGUMENT),
    ("open: warmup 1", "OpenSession", lambda: pb.OpenSessionRequest(job_id="x", modalities=["a", "b"], profile=pb.Profile(paper=pb.PaperProfile(warmup_epochs=1))), grpc.StatusCode.INVALID_ARGUMENT),
    ("open: negative attempt", "OpenSession", lambda: pb.OpenSessionRequest(job_id="x", attempt=-1, modalities=["a", "b"]), grpc.StatusCode.INVALID_ARGUMENT),
    ("open: same attempt, other config", "OpenSession", lambda: pb.OpenSessionRequest(job_id=JOB, attempt=1, world_size=2, modalities=["audio", "visual"]), grpc.StatusCode.ALREADY_EXISTS),
    ("open: lower attempt", "OpenSession", lambda: pb.OpenSessionRequest(job_id=JOB, attempt=0, world_size=2, modalities=["audio", "visual"], profile=pb.Profile(official=pb.OfficialProfile())), grpc.StatusCode.FAILED_PRECONDITION),
    ("end epoch: not open yet", "EndEpoch", lambda: pb.EndEpochRequest(job_id=JOB, attempt=1, epoch=5), grpc.StatusCode.FAILED_PRECONDITION),
    ("end epoch: stale attempt", "EndEpoch", lambda: pb.EndEpochRequest(job_id=JOB, attempt=0, epoch=1), grpc.StatusCode.FAILED_PRECONDITION),
    ("end epoch: unknown job", "EndEpoch", lambda: pb.EndEpochRequest(job_id="nope", attempt=0, epoch=0), grpc.StatusCode.NOT_FOUND),
    ("get: unknown job", "GetSession", lambda: pb.GetSessionRequest(job_id="nope"), grpc.StatusCode.NOT_FOUND),
    ("close: stale attempt", "CloseSession", lambda: pb.CloseSessionRequest(job_id=JOB, attempt=0), grpc.StatusCode.FAILED_PRECONDITION),
]


@pytest.mark.parametrize("name,method,make,code", BAD_OTHER, ids=[b[0] for b in BAD_OTHER])
def test_bad_session_calls(history: bytes, stub: pb_grpc.RegulatorStub, name: str, method: str, make: Callable[[], Any], code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(make(), timeout=30)
    assert info.value.code() == code, info.value.details()
    assert snapshot(stub) == history
    sessions = stub.ListSessions(pb.ListSessionsRequest(include_inactive=True), timeout=30).sessions
    assert [s.job_id for s in sessions] == [JOB]  # nothing half-created


def test_idempotent_open_end_epoch_and_close(history: bytes, client: RegulatorClient, stub: pb_grpc.RegulatorStub) -> None:
    again = client.open_session(JOB, ["audio", "visual"], "official", attempt=1, world_size=2)
    assert not again.created
    first = client.end_epoch(JOB, attempt=1, epoch=1)
    state = snapshot(stub)
    second = client.end_epoch(JOB, attempt=1, epoch=1)
    assert second.duplicate and second.closed == first.closed and list(second.next_window) == list(first.next_window)
    assert snapshot(stub) == state
    closed = client.close_session(JOB, attempt=1)
    assert closed.state == pb.SESSION_STATE_CLOSED
    assert client.close_session(JOB, attempt=1) == closed
    # a late rank's retry of an answered step still gets its stored answer after close
    assert stub.Report(report(epoch=1, step=29, stats=stats(30 + 29 % 3, 20 + 29 % 5)), timeout=30).duplicate
    with pytest.raises(grpc.RpcError) as info:  # but a new step is refused
        stub.Report(report(step=31, epoch=2), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_higher_attempt_supersedes_and_fences_the_old_one(history: bytes, client: RegulatorClient, stub: pb_grpc.RegulatorStub) -> None:
    resp = client.open_session(JOB, ["audio", "visual"], "official", attempt=2, world_size=2)
    assert resp.created and resp.session.steps == 0 and resp.session.epoch == 0
    old = client.get_session(JOB, attempt=1)
    assert old.session.state == pb.SESSION_STATE_SUPERSEDED
    with pytest.raises(grpc.RpcError) as info:
        stub.Report(report(step=30), timeout=30)  # attempt 1 keeps reporting
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stale" in info.value.details()
    assert client.get_session(JOB).session.steps == 0  # nothing mixed into attempt 2
