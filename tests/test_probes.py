"""The kubelet's probes restart only what a restart cures (issue 18, item 4).

A real server with its plaintext health port, asked over real gRPC what the manifests' probes
ask: liveness (and startup) check ``LIVENESS_NAME``, readiness checks the Regulator service.
While the store fails (its file removed, the disk full, a corrupt file at start) the regulator is
alive but not ready: a restart would not empty a disk nor repair a file, and a corrupt file must
not send the pod into CrashLoopBackOff (it starts, answers UNAVAILABLE, and the
state-store alert fires on ``inforeg_regulator_state_store_healthy 0``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from regulator_service.edge.server import LIVENESS_NAME, READINESS_NAMES, SERVICE_NAME, RegulatorServer, ServerConfig
from regulator_service.storage.sqlite import STATE_FILE

from .conftest import health, scrape, wait_until

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@contextlib.contextmanager
def regulator(state: Path, **config: object) -> Iterator[RegulatorServer]:
    server = RegulatorServer(ServerConfig(port=0, health_port=0, metrics_port=0, state_dir=state, **config))  # type: ignore[arg-type]
    with server:
        yield server


def probes(server: RegulatorServer) -> dict[str, int]:
    """What the kubelet's grpc probes get on the health port: {health name: status}."""
    target = f"127.0.0.1:{server.health_port}"
    return {name: health(target, name) for name in (LIVENESS_NAME, *READINESS_NAMES)}


def alive_not_ready(server: RegulatorServer) -> bool:
    return probes(server) == {LIVENESS_NAME: SERVING, "": NOT_SERVING, SERVICE_NAME: NOT_SERVING}


def open_session(target: str, job: str) -> grpc.StatusCode:
    req = pb.OpenSessionRequest(job_id=job, modalities=["a", "b"], profile=pb.Profile(official=pb.OfficialProfile()))
    with grpc.insecure_channel(target) as ch:
        try:
            pb_grpc.RegulatorStub(ch).OpenSession(req, timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


def report(target: str, job: str, step: int) -> grpc.StatusCode:
    req = pb.ReportRequest(job_id=job, epoch=0, step=step, count=8,
                           stats=[pb.ModalityStats(modality="a", score_sum=4.0, fisher=0.1),
                                  pb.ModalityStats(modality="b", score_sum=2.0, fisher=0.2)])
    with grpc.insecure_channel(target) as ch:
        try:
            pb_grpc.RegulatorStub(ch).Report(req, timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


def test_liveness_and_readiness_are_different_names() -> None:
    assert LIVENESS_NAME not in READINESS_NAMES and SERVICE_NAME in READINESS_NAMES


def test_a_healthy_regulator_is_alive_and_ready(tmp_path: Path) -> None:
    with regulator(tmp_path / "state") as server:
        assert set(probes(server).values()) == {SERVING}
        port = server.health_port
    # Control: a stopped regulator answers neither, so the probes above can fail.
    with pytest.raises(grpc.RpcError):
        health(f"127.0.0.1:{port}", LIVENESS_NAME)


def test_a_corrupt_state_file_starts_alive_not_ready_and_answers_unavailable(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    damage = b"definitely not sqlite" * 64
    (state / STATE_FILE).write_bytes(damage)
    with regulator(state) as server:
        assert alive_not_ready(server)
        assert open_session(server.target, "job") == grpc.StatusCode.UNAVAILABLE
        assert "inforeg_regulator_state_store_healthy 0.0" in scrape(server.metrics_port)  # type: ignore[arg-type]
    assert (state / STATE_FILE).read_bytes() == damage  # never rewritten


def test_a_removed_state_file_is_alive_not_ready(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with regulator(state) as server:
        assert open_session(server.target, "job") == grpc.StatusCode.OK
        assert set(probes(server).values()) == {SERVING}
        (state / STATE_FILE).unlink()
        wait_until(lambda: alive_not_ready(server), "liveness SERVING, readiness NOT_SERVING without the state file")


@pytest.mark.e2e
def test_a_full_disk_is_alive_not_ready(tmp_path: Path) -> None:
    """SQLite's page limit stands in for the full disk (the same SQLITE_FULL; see
    tests/test_store_failures.py for a real tmpfs)."""
    with regulator(tmp_path / "state", debug_max_state_bytes=96 * 1024) as server:
        assert open_session(server.target, "full") == grpc.StatusCode.OK
        codes = (report(server.target, "full", step) for step in range(20000))
        assert next(c for c in codes if c != grpc.StatusCode.OK) == grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: alive_not_ready(server), "liveness SERVING, readiness NOT_SERVING on a full disk")
