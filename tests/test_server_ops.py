"""The server as operators see it: CLI, health, reflection, metrics, graceful SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from regulator_client import RegulatorClient
from regulator_service.edge.server import SERVICE_NAME, RegulatorServer, ServerConfig

from .conftest import health, metric, roomy_limits, scrape


def test_health_reflection_and_metrics(tmp_path: Path) -> None:
    with RegulatorServer(ServerConfig(port=0, metrics_port=0, state_dir=tmp_path, limits=roomy_limits())) as srv:
        with grpc.insecure_channel(srv.target) as ch:
            for service in ("", SERVICE_NAME):
                assert health(srv.target, service) == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
            names = {s.name for s in answers[0].list_services_response.service}
            assert SERVICE_NAME in names and "grpc.health.v1.Health" in names
        with RegulatorClient.connect(srv.target, report_stream=False) as client:  # unary Reports, as older clients send
            client.open_session("m-job", ["a", "b"], "official")
            client.report("m-job", attempt=0, epoch=0, step=0, count=4, score_sums={"a": 3.0, "b": 1.0}, fisher={"a": 0.5, "b": 0.25})
            client.end_epoch("m-job", attempt=0, epoch=0)
            with pytest.raises(Exception):
                client.report("m-job", attempt=0, epoch=1, step=0, count=4, score_sums={"a": 3.0, "b": 2.0}, fisher={"a": 0.5, "b": 0.25})
            text = scrape(srv.metrics_port)
            assert metric(text, "inforeg_regulator_sessions_open") == 1
            assert metric(text, "inforeg_regulator_reports_total", outcome="recorded") == 1
            assert metric(text, "inforeg_regulator_reports_total", outcome="rejected") == 1
            assert metric(text, "inforeg_regulator_fisher_trace", job_id="m-job", modality="a") == 0.5
            assert metric(text, "inforeg_regulator_window_open", job_id="m-job", modality="b") == 1
            assert metric(text, "inforeg_regulator_proximal_coefficient", job_id="m-job", modality="a") > 0.95
            assert metric(text, "grpc_server_handled_total", grpc_type="unary", grpc_service=SERVICE_NAME, grpc_method="Report", grpc_code="AlreadyExists") == 1
            assert metric(text, "grpc_server_handled_total", grpc_type="unary", grpc_service=SERVICE_NAME, grpc_method="Report", grpc_code="OK") == 1
            client.close_session("m-job", attempt=0)
            text = scrape(srv.metrics_port)
            assert metric(text, "inforeg_regulator_sessions_open") == 0
            assert 'job_id="m-job"' not in text  # per-job series are removed on close
        with RegulatorClient.connect(srv.target) as client:  # the default: Reports on one stream per job
            client.open_session("s-job", ["a", "b"], "official")
            for step in range(3):
                client.report("s-job", attempt=0, epoch=0, step=step, count=4, score_sums={"a": 3.0, "b": 1.0}, fisher={"a": 0.5, "b": 0.25})
            text = scrape(srv.metrics_port)
            assert metric(text, "inforeg_regulator_reports_total", outcome="recorded") == 4
            assert metric(text, "grpc_server_started_total", grpc_type="bidi_stream", grpc_service=SERVICE_NAME, grpc_method="ReportStream") == 1
            assert metric(text, "grpc_server_started_total", grpc_type="unary", grpc_service=SERVICE_NAME, grpc_method="Report") == 2


def test_serve_cli_port_zero_and_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "regulator_cli", "serve", "--port", "0", "--metrics-port", "-1", "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.match(r"regulator serving on 127\.0\.0\.1:(\d+) \(metrics off, state (.+)\)$", line.strip())
        assert match, line
        target = f"127.0.0.1:{match.group(1)}"
        with RegulatorClient.connect(target) as client:
            client.open_session("cli-job", ["a", "b"])
            assert [s.job_id for s in client.list_sessions()] == ["cli-job"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "state flushed" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "regulator.sqlite3").exists()


def test_port_clash_is_an_error(tmp_path: Path) -> None:
    with RegulatorServer(ServerConfig(port=0)) as srv:
        with pytest.raises(OSError, match="cannot listen"):
            RegulatorServer(ServerConfig(port=srv.port, state_dir=tmp_path, limits=roomy_limits())).start()
