"""The client side of the Report stream (issue 20 item 6): ``GrpcTransport.report`` sends a job's
Reports as the messages of one ``ReportStream`` per job, against real servers on loopback.

Trains the same as unary Reports (weights, history), keeps one stream for a job's steps, falls
back to unary on an older server (UNIMPLEMENTED) or a full one (``--max-streams``), gives
``DeadlineExceeded`` on a hung server (SIGSTOP) within about the call's timeout and continues
after it resumes, and ``Unavailable`` (never a permanent error) when its server is killed."""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from regulator_client import RegulatorClient
from regulator_client.environment import REPORT_STREAM, report_stream_enabled
from regulator_client.errors import DeadlineExceeded, Unavailable
from regulator_client.transport import GrpcTransport
from regulator_service.client_api import build_api
from regulator_service.edge.servicer import RegulatorServicer
from regulator_service.edge.wire_handlers import add_regulator_servicer
from trainers.digits import TrainConfig, train
from trainers.digits_data import load_split
from trainers.serverproc import ServerProcess

from .conftest import scrape, wait_until
from .serving import serving

VIEWS = ("fac", "zer")
STATS = {"a": 4.0, "b": 2.0}
FISHER = {"a": 0.1, "b": 0.2}


def started(metrics_port: int, method: str) -> float:
    """``grpc_server_started_total`` of ``method`` (0 when the server has not seen one)."""
    m = re.search(r'grpc_server_started_total\{grpc_method="%s",[^}]*\} ([0-9.e+]+)' % method, scrape(metrics_port))
    return float(m.group(1)) if m else 0.0


def handled(metrics_port: int, method: str, code: str) -> float:
    m = re.search(r'grpc_server_handled_total\{grpc_code="%s",grpc_method="%s",[^}]*\} ([0-9.e+]+)' % (code, method),
                  scrape(metrics_port))
    return float(m.group(1)) if m else 0.0


def report(client: RegulatorClient, job: str, step: int, **stats: float) -> pb.ReportResponse:
    return client.report(job, attempt=0, epoch=0, step=step, count=8, score_sums={**STATS, **stats}, fisher=FISHER)


def test_the_switch_reads_on_and_off_and_names_a_bad_value() -> None:
    assert report_stream_enabled({}) and report_stream_enabled({REPORT_STREAM: "on"})
    assert not report_stream_enabled({REPORT_STREAM: "off"}) and not report_stream_enabled({REPORT_STREAM: "0"})
    with pytest.raises(ValueError, match=REPORT_STREAM):
        report_stream_enabled({REPORT_STREAM: "sometimes"})
    assert GrpcTransport("127.0.0.1:1", report_stream=False).report_streams is None


@pytest.mark.e2e
def test_a_job_on_a_stream_trains_as_on_unary_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same digits job with the stream (the default) and with ``REGULATOR_REPORT_STREAM=off``:
    the same weights, coefficients and history; the server saw one ReportStream for the first
    job's every step (ended by the client's close, OK) and unary Reports for the second."""
    from .test_faults import history

    digits = load_split(VIEWS)
    cfg = dict(views=VIEWS, profile="official", seed=5, epochs=2, on_unavailable="wait", call_timeout=10.0)
    with serving(tmp_path, "--metrics-port", "0") as srv:
        assert srv.metrics_port is not None
        monkeypatch.delenv(REPORT_STREAM, raising=False)
        with RegulatorClient.connect(srv.target) as client:
            on_stream = train(TrainConfig(job_id="job", **cfg), client, digits)
            streams = client.transport.report_streams
            assert streams is not None and streams.opened == 1  # one stream for all the job's steps
        assert started(srv.metrics_port, "ReportStream") == 1 and started(srv.metrics_port, "Report") == 0
        assert handled(srv.metrics_port, "ReportStream", "OK") == 1  # close() ended it: the server saw its end
        stream_history = history(srv.target, "job")

        monkeypatch.setenv(REPORT_STREAM, "off")
        with RegulatorClient.connect(srv.target) as client:
            assert client.transport.report_streams is None
            on_unary = train(TrainConfig(job_id="job-unary", **cfg), client, digits)
        assert started(srv.metrics_port, "ReportStream") == 1
        assert started(srv.metrics_port, "Report") == len(on_stream["applied"]) == 50
        assert on_stream["fallback_steps"] == on_unary["fallback_steps"] == 0
        assert on_stream["applied"] == on_unary["applied"]
        assert on_stream["weights_digest"] == on_unary["weights_digest"]
        assert stream_history == history(srv.target, "job-unary")


def old_server(refusal: grpc.StatusCode) -> tuple[grpc.Server, str]:
    """A real regulator servicer on loopback whose ReportStream answers ``refusal`` at once:
    UNIMPLEMENTED is what a servicer generated before the RPC existed answers."""

    class Servicer(RegulatorServicer):
        if refusal == grpc.StatusCode.UNIMPLEMENTED:
            ReportStream = pb_grpc.RegulatorServicer.ReportStream  # the generated base: no such method
        else:
            def ReportStream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
                context.abort(refusal, "no room for a stream")

    server = grpc.server(ThreadPoolExecutor(4))
    add_regulator_servicer(Servicer(build_api()), server)  # as `regulator serve` registers it
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("refusal", [grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_an_older_or_full_server_gets_unary_reports(refusal: grpc.StatusCode, caplog: pytest.LogCaptureFixture) -> None:
    server, target = old_server(refusal)
    try:
        with caplog.at_level(logging.INFO, logger="regulator_client.report_stream"), \
                RegulatorClient.connect(target, timeout=10) as client:
            client.open_session("old", ["a", "b"], "official")
            answers = [report(client, "old", step) for step in range(5)]
            assert [a.duplicate for a in answers] == [False] * 5  # each step answered, once
            streams = client.transport.report_streams
            assert streams is not None and streams.opened == 1  # tried once, then unary
            assert streams.unimplemented == (refusal == grpc.StatusCode.UNIMPLEMENTED)
            assert client.get_session("old").session.steps == 5
        lines = [r for r in caplog.records if r.name == "regulator_client.report_stream"]
        assert len(lines) == 1 and lines[0].levelno == logging.INFO, [r.getMessage() for r in lines]
    finally:
        server.stop(0)


def test_a_full_server_is_asked_for_a_stream_again_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """After RESOURCE_EXHAUSTED at open the job sends unary Reports for ``RETRY_STREAM_S``, then
    tries a stream again (here at once: the pause set to 0)."""
    from regulator_client import report_stream

    monkeypatch.setattr(report_stream, "RETRY_STREAM_S", 0.0)
    server, target = old_server(grpc.StatusCode.RESOURCE_EXHAUSTED)
    try:
        with RegulatorClient.connect(target, timeout=10) as client:
            client.open_session("again", ["a", "b"], "official")
            assert [report(client, "again", step).duplicate for step in range(3)] == [False] * 3
            assert client.transport.report_streams.opened == 3  # type: ignore[union-attr]
    finally:
        server.stop(0)


@pytest.mark.e2e
def test_a_server_at_its_max_streams_gets_unary_reports(tmp_path: Path) -> None:
    with serving(tmp_path, "--max-streams", "0", "--metrics-port", "0") as srv:
        with RegulatorClient.connect(srv.target, timeout=10) as client:
            client.open_session("full", ["a", "b"], "official")
            assert [report(client, "full", step).duplicate for step in range(3)] == [False] * 3
            assert client.transport.report_streams.opened == 1  # type: ignore[union-attr]
        assert started(srv.metrics_port, "Report") == 3  # type: ignore[arg-type]


def all_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (state T in ``/proc``): SIGSTOP is delivered to
    each thread as it next enters the kernel, not when ``kill`` returns."""
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            states.append(Path(f"/proc/{pid}/task/{task}/stat").read_text().rpartition(")")[2].split()[0])
        except OSError:
            continue  # a thread that ended meanwhile
    return all(state in ("T", "t") for state in states)


@pytest.mark.e2e
def test_a_hung_server_gives_deadline_exceeded_and_the_stream_resumes_after() -> None:
    """SIGSTOP the server with the stream open: the next Report raises ``DeadlineExceeded`` after
    about its 1 s timeout (the watchdog cancels the stream; grpcio's iterator has no timeout),
    not never; after SIGCONT the step is resent on a new stream and answered once."""
    with ServerProcess(None) as srv, RegulatorClient.connect(srv.target, timeout=1.0) as client:
        assert srv.proc is not None
        client.open_session("hung", ["a", "b"], "official")
        first = report(client, "hung", 0)
        pool = ThreadPoolExecutor(1)
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: all_stopped(srv.proc.pid), "every server thread stopped")  # kill() only queues it
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                pool.submit(report, client, "hung", 1).result(timeout=60)  # a hang fails, not blocks, the test
            waited = time.monotonic() - t0
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
            pool.shutdown(wait=False)
        assert 1.0 <= waited < 30  # bounded by the deadline, not hanging (a loaded machine is slow)
        again = report(client, "hung", 1)  # the same step again: answered (perhaps as a duplicate)
        assert report(client, "hung", 2).duplicate is False
        assert client.transport.report_streams.opened == 2  # type: ignore[union-attr]
        detail = client.get_session("hung", include_steps=True)
    assert [s.step for s in detail.steps] == [0, 1, 2]  # every step once
    assert again.step.modalities[0].factors.proximal == detail.steps[1].modalities[0].factors.proximal
    assert first.step.modalities[0].factors.proximal == detail.steps[0].modalities[0].factors.proximal


@pytest.mark.e2e
def test_a_killed_server_is_unavailable_never_a_permanent_error() -> None:
    with ServerProcess(None) as srv, RegulatorClient.connect(srv.target, timeout=5.0) as client:
        client.open_session("killed", ["a", "b"], "official")
        report(client, "killed", 0)
        srv.kill()
        with pytest.raises(Unavailable):  # the open stream breaks
            report(client, "killed", 1)
        with pytest.raises(Unavailable):  # and the next Report's new stream is refused likewise
            report(client, "killed", 1)


@pytest.mark.e2e
def test_a_forked_process_opens_its_own_stream_and_the_parent_keeps_its_own() -> None:
    """A process forked while the parent's stream is open (a DataLoader worker) that reports
    through the inherited transport opens a stream on its own channel; the parent's stream goes on."""
    with ServerProcess(None) as srv, RegulatorClient.connect(srv.target, timeout=10) as client:
        client.open_session("forked", ["a", "b"], "official")
        report(client, "forked", 0)
        pid = os.fork()
        if pid == 0:  # the child: exit code 0 only if its own stream answered its step
            code = 1
            try:
                streams = client.transport.report_streams
                ok = report(client, "forked", 1).duplicate is False and streams is not None and streams.opened == 2
                code = 0 if ok else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert report(client, "forked", 2).duplicate is False
        assert client.transport.report_streams.opened == 1  # type: ignore[union-attr]
        assert [s.step for s in client.get_session("forked", include_steps=True).steps] == [0, 1, 2]


@pytest.mark.e2e
def test_a_renewed_channel_gets_a_new_stream_and_the_old_one_ends(tmp_path: Path) -> None:
    """TLS files renewed (the CA file replaced): the next Report goes on a new channel with a new
    stream; the old stream is half-closed, so the server ends it as OK, not cancelled."""
    import shutil

    from regulator_client.transport import TlsConfig
    from regulator_service.edge.security import TlsFiles
    from regulator_service.edge.server import RegulatorServer, ServerConfig

    from .pki import make_pki

    pki = make_pki(tmp_path)
    ca = tmp_path / "client-ca.pem"
    shutil.copyfile(pki.ca, ca)
    config = ServerConfig(port=0, tls=TlsFiles(pki.server_cert, pki.server_key), metrics_port=0)
    with RegulatorServer(config) as server:
        transport = GrpcTransport(f"localhost:{server.port}", timeout=10, tls=TlsConfig(ca=str(ca)), tls_recheck_s=0.0)
        with RegulatorClient(transport) as client:
            client.open_session("renewed", ["a", "b"], "official")
            report(client, "renewed", 0)
            renewed = ca.with_suffix(".new")
            shutil.copyfile(pki.ca, renewed)
            os.replace(renewed, ca)  # cert-manager's renewal: a new file in its place
            assert report(client, "renewed", 1).duplicate is False
            assert transport.channels_opened == 2 and transport.report_streams.opened == 2  # type: ignore[union-attr]
            gc.collect()  # a collected grpcio call cancels itself: the old stream must be held until it ends
            port = server.metrics_port
            assert port is not None
            deadline = time.monotonic() + 60  # a liveness bound for a loaded machine
            while handled(port, "ReportStream", "OK") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            ended = re.findall(r'grpc_server_handled_total\{grpc_code="(\w+)",grpc_method="ReportStream".*\} ([1-9][0-9.]*)',
                               scrape(port))
            assert ended == [("OK", "1.0")], ended  # the old stream ended by its half-close, not cancelled
            assert report(client, "renewed", 2).duplicate is False
            assert [s.step for s in client.get_session("renewed", include_steps=True).steps] == [0, 1, 2]
