"""``ReportStream``, the server side, over real gRPC on loopback with the raw generated stub:
each message answered as a unary Report is, the first failure ending the stream with the unary
status, the stream's job held, ``--max-streams`` admission apart from unary admission, metrics,
an unusable store, and the drain on stop."""

from __future__ import annotations

import queue
import re
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import grpc
import pytest
from prometheus_client import generate_latest

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from regulator_client.routing import JOB_HEADER as CLIENT_JOB_HEADER
from regulator_service.edge.admission import STREAMS_FULL_MESSAGE
from regulator_service.errors import RETRY_AFTER_KEY
from regulator_service.edge.security import TokenSource
from regulator_service.edge.server import RegulatorServer, ServerConfig
from regulator_service.edge.servicer import DRAINING_MESSAGE, JOB_HEADER
from regulator_service.storage.sqlite import STATE_FILE

from .conftest import metric, roomy_limits, wait_until

MODALITIES = ["audio", "visual"]
STREAM = "/inforeg.regulator.v1.Regulator/ReportStream"
BIDI = {"grpc_type": "bidi_stream", "grpc_service": "inforeg.regulator.v1.Regulator", "grpc_method": "ReportStream"}


def report(job: str, step: int, epoch: int = 0, a: float = 30.0, b: float = 20.0, **kw: Any) -> pb.ReportRequest:
    stats = [pb.ModalityStats(modality="audio", score_sum=a, fisher=1e-3 * (1 + step % 3)),
             pb.ModalityStats(modality="visual", score_sum=b, fisher=2e-3)]
    base: dict[str, Any] = dict(job_id=job, attempt=1, rank=0, epoch=epoch, step=step, count=64, stats=stats)
    base.update(kw)
    return pb.ReportRequest(**base)


class Stream:
    """One open ReportStream: ``send`` writes a message and reads its answer."""

    def __init__(self, stub: pb_grpc.RegulatorStub, job: Optional[str] = None) -> None:
        self._out: queue.Queue[Optional[pb.ReportRequest]] = queue.Queue()
        metadata = ((JOB_HEADER, job),) if job is not None else ()
        self.call = stub.ReportStream(iter(self._out.get, None), metadata=metadata, timeout=60)

    def send(self, request: pb.ReportRequest) -> pb.ReportResponse:
        self._out.put(request)
        return next(self.call)

    def failure(self, request: Optional[pb.ReportRequest] = None) -> grpc.RpcError:
        """The status the stream ends with (after sending ``request``, if given)."""
        if request is not None:
            self._out.put(request)
        with pytest.raises(grpc.RpcError) as err:
            next(self.call)
        return err.value

    def close(self) -> None:
        self._out.put(None)
        assert list(self.call) == []


def open_job(stub: pb_grpc.RegulatorStub, job: str) -> None:
    stub.OpenSession(pb.OpenSessionRequest(job_id=job, attempt=1, world_size=1, modalities=MODALITIES), timeout=30)


@pytest.fixture
def stub(server: RegulatorServer) -> Iterator[pb_grpc.RegulatorStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.RegulatorStub(channel)


def test_the_job_header_is_the_clients_routing_header() -> None:
    assert JOB_HEADER == CLIENT_JOB_HEADER


def test_a_stream_answers_byte_for_byte_what_unary_reports_answer(server: RegulatorServer, stub: pb_grpc.RegulatorStub) -> None:
    open_job(stub, "streamed")
    open_job(stub, "unary")
    stream = Stream(stub, "streamed")
    plan = [(0, s) for s in range(6)] + [(0, 5), (0, 2)] + [(1, s) for s in range(6, 12)]
    for i, (epoch, step) in enumerate(plan):
        if epoch == 1 and step == 6:  # EndEpoch (unary) while the stream stays open
            for job in ("streamed", "unary"):
                stub.EndEpoch(pb.EndEpochRequest(job_id=job, attempt=1, epoch=0), timeout=30)
        streamed = stream.send(report("streamed", step, epoch, a=30.0 + step % 4, b=20.0 + step % 3))
        unary = stub.Report(report("unary", step, epoch, a=30.0 + step % 4, b=20.0 + step % 3), timeout=30)
        assert streamed.SerializeToString(deterministic=True) == unary.SerializeToString(deterministic=True), (epoch, step)
        assert streamed.duplicate == ((epoch, step) in plan[:i])
    stream.close()
    streamed_epochs, unary_epochs = (
        [e.SerializeToString(deterministic=True)
         for e in stub.GetSession(pb.GetSessionRequest(job_id=job, include_steps=True), timeout=30).epochs]
        for job in ("streamed", "unary")
    )
    assert streamed_epochs == unary_epochs and len(streamed_epochs) == 2


BAD = {
    "unknown modality": lambda job: report(job, 3, stats=[pb.ModalityStats(modality="text", score_sum=1, fisher=1)] * 2),
    "epoch not open": lambda job: report(job, 3, epoch=4),
    "conflicting duplicate step": lambda job: report(job, 1, a=1.0),
    "stale attempt": lambda job: report(job, 3, attempt=0),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_refused_message_ends_the_stream_with_the_unary_status(stub: pb_grpc.RegulatorStub, case: str) -> None:
    open_job(stub, "streamed")
    open_job(stub, "unary")
    stream = Stream(stub)
    for step in range(3):
        stream.send(report("streamed", step))
        stub.Report(report("unary", step), timeout=30)
    with pytest.raises(grpc.RpcError) as unary:
        stub.Report(BAD[case]("unary"), timeout=30)
    streamed = stream.failure(BAD[case]("streamed"))
    # the same status and message, but for the job's name in it
    assert (streamed.code(), streamed.details()) == (unary.value.code(), unary.value.details().replace("unary", "streamed"))
    assert streamed.trailing_metadata() == unary.value.trailing_metadata()
    # nothing after the failure is read; a new stream goes on where the job was
    assert Stream(stub).send(report("streamed", 3)).step.step == 3


def test_an_unusable_state_store_answers_unavailable(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE).write_bytes(b"definitely not sqlite" * 64)
    with RegulatorServer(ServerConfig(port=0, state_dir=state, limits=roomy_limits())) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            err = Stream(pb_grpc.RegulatorStub(channel), "any").failure(report("any", 0))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "state store unusable" in err.details()


@pytest.mark.e2e
def test_a_job_another_replica_holds_ends_the_stream_as_a_unary_report_is_answered(pg_dsn: str) -> None:
    """Two replicas on one PostgreSQL: the one that does not hold the job's lease answers a
    streamed Report as a unary one, UNAVAILABLE with the retry-after key."""
    config = ServerConfig(port=0, store_dsn=pg_dsn, lease_ttl_s=60.0, limits=roomy_limits())
    with RegulatorServer(config) as holder, RegulatorServer(config) as other, \
            grpc.insecure_channel(holder.target) as to_holder, grpc.insecure_channel(other.target) as to_other:
        open_job(pb_grpc.RegulatorStub(to_holder), "held")
        Stream(pb_grpc.RegulatorStub(to_holder), "held").send(report("held", 0))
        stub = pb_grpc.RegulatorStub(to_other)
        with pytest.raises(grpc.RpcError) as unary:
            stub.Report(report("held", 1), timeout=30)
        streamed = Stream(stub, "held").failure(report("held", 1))
    assert unary.value.code() == grpc.StatusCode.UNAVAILABLE
    def shown(details: str) -> str:  # the lease's time left ticks between the two answers
        return re.sub(r"within [0-9.]+s", "within Ns", details)

    assert (streamed.code(), shown(streamed.details())) == (unary.value.code(), shown(unary.value.details()))
    keys = [[k for k, _ in call.trailing_metadata()] for call in (streamed, unary.value)]  # values: the lease's time left
    assert keys[0] == keys[1] == [RETRY_AFTER_KEY]


def test_every_message_must_be_of_the_streams_job(stub: pb_grpc.RegulatorStub) -> None:
    for job in ("mine", "theirs"):
        open_job(stub, job)
    by_header = Stream(stub, "mine").failure(report("theirs", 0))
    assert by_header.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'mine'" in by_header.details() and "'theirs'" in by_header.details()
    by_first = Stream(stub)
    by_first.send(report("mine", 0))
    later = by_first.failure(report("theirs", 0))
    assert later.code() == grpc.StatusCode.INVALID_ARGUMENT and "'theirs'" in later.details()
    assert stub.GetSession(pb.GetSessionRequest(job_id="theirs"), timeout=30).session.steps == 0


def test_an_undecodable_message_is_invalid_argument(server: RegulatorServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.stream_stream(STREAM)
        with pytest.raises(grpc.RpcError) as err:
            list(raw(iter([b"\xff\xff\xff"]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value


def scraped(srv: RegulatorServer, name: str, **labels: str) -> float:
    return metric(generate_latest(srv.registry).decode(), name, **labels)


def test_streams_are_admitted_apart_from_unary_calls(tmp_path: Path) -> None:
    """--max-streams 1 and --max-concurrent-rpcs 1: an open stream leaves the unary slot free;
    a second stream is refused at open, and a stream is admitted again once the first ends."""
    config = ServerConfig(port=0, max_streams=1, max_concurrent_rpcs=1, max_workers=1, limits=roomy_limits())
    with RegulatorServer(config) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.RegulatorStub(channel)
        open_job(stub, "a")
        first = Stream(stub, "a")
        first.send(report("a", 0))
        assert scraped(srv, "inforeg_regulator_report_streams_open") == 1
        second = Stream(stub, "a").failure()
        assert (second.code(), second.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, STREAMS_FULL_MESSAGE)
        assert stub.Report(report("a", 1), timeout=30).step.step == 1  # unary Reports go on
        assert first.send(report("a", 2)).step.step == 2
        first.close()
        wait_until(lambda: scraped(srv, "inforeg_regulator_report_streams_open") == 0, "the stream is counted closed")
        Stream(stub, "a").send(report("a", 3))
    with RegulatorServer(ServerConfig(port=0, max_streams=0, limits=roomy_limits())) as srv, grpc.insecure_channel(srv.target) as channel:
        off = Stream(pb_grpc.RegulatorStub(channel)).failure()
        assert off.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_metrics_count_each_streamed_report(server: RegulatorServer, stub: pb_grpc.RegulatorStub) -> None:
    open_job(stub, "counted")
    before = {o: scraped(server, "inforeg_regulator_reports_total", outcome=o) for o in ("recorded", "duplicate", "rejected")}
    stream = Stream(stub, "counted")
    for step in (0, 1, 2, 2):
        stream.send(report("counted", step))
    stream.failure(report("counted", 9, epoch=5))
    after = {o: scraped(server, "inforeg_regulator_reports_total", outcome=o) for o in before}
    assert {o: after[o] - before[o] for o in before} == {"recorded": 3, "duplicate": 1, "rejected": 1}
    assert scraped(server, "grpc_server_msg_received_total", **BIDI) == 5
    assert scraped(server, "grpc_server_msg_sent_total", **BIDI) == 4
    assert scraped(server, "grpc_server_started_total", **BIDI) == 1
    wait_until(lambda: scraped(server, "grpc_server_handled_total", **BIDI, grpc_code="FailedPrecondition") == 1,
               "the stream is counted handled with its status")


def test_on_stop_streams_end_with_unavailable(tmp_path: Path) -> None:
    """While draining, the message in hand is answered and its stream then ends UNAVAILABLE; an
    idle stream ends when the grace is over (grpc cancels it: its client sees UNAVAILABLE too)."""
    srv = RegulatorServer(ServerConfig(port=0, limits=roomy_limits(), grace_seconds=30.0)).start()
    channel = grpc.insecure_channel(srv.target)
    stub = pb_grpc.RegulatorStub(channel)
    open_job(stub, "busy")
    open_job(stub, "idle")
    busy, idle = Stream(stub, "busy"), Stream(stub, "idle")
    busy.send(report("busy", 0))
    idle.send(report("idle", 0))
    stopping = threading.Thread(target=srv.stop, kwargs={"grace": 2.0})
    stopping.start()
    try:
        wait_until(srv.servicer.draining.is_set, "the server drains")
        try:
            answered = busy.send(report("busy", 1))
        except grpc.RpcError as err:  # the stream resumed only after the drain began: nothing was in hand
            ended = err
        else:  # the message was in hand when the drain began: answered, then the end
            assert answered.step.step == 1
            ended = busy.failure()
        assert (ended.code(), ended.details()) == (grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        assert idle.failure().code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stopping.join(timeout=60)
        channel.close()


def test_a_stream_needs_the_bearer_token(tmp_path: Path) -> None:
    token = "stream-token-0123456789"
    with RegulatorServer(ServerConfig(port=0, token=TokenSource(token), limits=roomy_limits())) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.RegulatorStub(channel)
            for sent in ((), (("authorization", "Bearer not-the-token-0123456789"),)):
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.ReportStream(iter([report("a", 0)]), metadata=sent, timeout=30))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            auth = (("authorization", f"Bearer {token}"),)
            stub.OpenSession(pb.OpenSessionRequest(job_id="a", attempt=1, modalities=MODALITIES), metadata=auth, timeout=30)
            assert [r.step.step for r in stub.ReportStream(iter([report("a", 0)]), metadata=auth, timeout=30)] == [0]


def test_the_max_streams_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from regulator_cli.main import build_parser
    from regulator_service.serve import config_from_args

    def config(*argv: str) -> ServerConfig:
        return config_from_args(build_parser().parse_args(["serve", "--in-memory", *argv]), env={})

    assert config().max_streams == 256 and config("--max-streams", "0").max_streams == 0
    with pytest.raises(ValueError, match="--max-streams must be >= 0"):
        config("--max-streams", "-1")
    monkeypatch.setenv("REGULATOR_MAX_STREAMS", "7")
    assert config().max_streams == 7


def test_the_debug_hold_file_holds_each_streamed_message(tmp_path: Path) -> None:
    """Fault injection (``--debug-hold-file``) holds a stream's messages as it holds unary calls."""
    hold = tmp_path / "hold"
    with RegulatorServer(ServerConfig(port=0, debug_hold_file=str(hold), limits=roomy_limits())) as srv, \
            grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.RegulatorStub(channel)
        open_job(stub, "held")
        hold.touch()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ReportStream(iter([report("held", 0)]), timeout=0.5))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        hold.unlink()
        assert [r.step.step for r in stub.ReportStream(iter([report("held", 0)]), timeout=30)] == [0]
