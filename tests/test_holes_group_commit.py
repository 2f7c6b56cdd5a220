"""Group commit: "answered OK => durable" when the shared COMMIT fails.

Two jobs' Reports reach a real ``regulator serve`` (SQLite state) while another connection holds
the state file's write lock (``BEGIN IMMEDIATE``), so the store's writer waits and the second
Report queues behind the first: both go into the next transaction. Before the lock is released
the server process may no longer write files (``RLIMIT_FSIZE`` 0, set from outside with
prlimit: every write(2) fails with EFBIG, as on a disk that refuses writes), so that
transaction's COMMIT, where SQLite writes the WAL, fails. Neither caller may be answered OK, and
neither step may be in the history: not while the server runs, not after a restart."""

from __future__ import annotations

import resource
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from trainers.serverproc import ServerProcess

from .conftest import scrape, wait_until

pytestmark = pytest.mark.e2e

JOBS = ("first", "second")


def state_file(state_dir: Path) -> Path:
    """The server's SQLite database in its state directory (found by its header, not its name)."""
    found = [p for p in state_dir.iterdir() if p.is_file() and p.read_bytes()[:16] == b"SQLite format 3\x00"]
    assert len(found) == 1, found
    return found[0]


def reports_started(metrics_port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for fam in text_string_to_metric_families(scrape(metrics_port))
        for s in fam.samples
        if s.name == "grpc_server_started_total" and s.labels.get("grpc_method") == "Report"
    )


def report(job: str) -> pb.ReportRequest:
    return pb.ReportRequest(
        job_id=job, attempt=0, epoch=0, step=0, count=8,
        stats=[pb.ModalityStats(modality="a", score_sum=4.0, fisher=0.1), pb.ModalityStats(modality="b", score_sum=2.0, fisher=0.2)],
    )


def recorded_steps(stub: pb_grpc.RegulatorStub, job: str) -> int:
    detail = stub.GetSession(pb.GetSessionRequest(job_id=job, include_steps=True), timeout=60)
    assert len(detail.steps) == detail.session.steps
    return detail.session.steps


def test_a_failed_shared_commit_answers_no_caller_ok_and_writes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with ServerProcess(str(state)) as server, grpc.insecure_channel(server.target) as channel:
        assert server.proc is not None
        stub = pb_grpc.RegulatorStub(channel)
        for job in JOBS:
            stub.OpenSession(pb.OpenSessionRequest(job_id=job, modalities=["a", "b"]), timeout=60)
        locker = sqlite3.connect(state_file(state), isolation_level=None, timeout=0)
        locker.execute("BEGIN IMMEDIATE")  # the store's writer waits for this lock
        limited = False
        try:
            calls = [stub.Report.future(report(job), timeout=120) for job in JOBS]
            wait_until(lambda: reports_started(server.metrics_port) == len(JOBS), "both Reports reach the server")
            # The Reports need a moment to reach the store's queue behind the lock. A correct store
            # passes whether or not they get there in time; it is the shared transaction (their
            # being there) that lets this test catch a caller answered before the COMMIT.
            time.sleep(1.0)
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
            limited = True
            locker.execute("ROLLBACK")  # the writer goes on: statements, then the COMMIT fails
            outcomes = []
            for call in calls:
                try:
                    call.result()
                    outcomes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    outcomes.append(exc.code())
        finally:
            locker.close()
            if limited:
                resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert outcomes == [grpc.StatusCode.UNAVAILABLE] * len(JOBS), outcomes
        assert [recorded_steps(stub, job) for job in JOBS] == [0, 0]
    # what the state file holds: a fresh server reads it back
    with ServerProcess(str(state)) as again, grpc.insecure_channel(again.target) as channel:
        stub = pb_grpc.RegulatorStub(channel)
        assert [recorded_steps(stub, job) for job in JOBS] == [0, 0]
        for job in JOBS:  # and the store takes writes again
            assert not stub.Report(report(job), timeout=60).duplicate
        assert [recorded_steps(stub, job) for job in JOBS] == [1, 1]
