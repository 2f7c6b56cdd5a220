"""Store edges (issue 19 item 6 and its smaller findings): a Report whose own commit hangs (a
frozen disk) answers UNAVAILABLE at ``--store-timeout`` like every other call, and "answered OK
=> durable" still holds - the client's retry gets the stored answer once, never a second step;
a corrupt state file is inspected without files appearing beside it; a read-only state
directory is refused in one line. Real gRPC servers on loopback, real SQLite files."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from regulator_client import RegulatorClient
from regulator_service.edge.server import RegulatorServer, ServerConfig
from regulator_service.storage.base import StoreError
from regulator_service.storage.sqlite import STATE_FILE, SQLiteStore

from .conftest import ROOT, roomy_limits, wait_until

STORE_TIMEOUT_S = 2.0
STATS: dict[str, Any] = dict(count=8, score_sums={"a": 4.0, "b": 2.0}, fisher={"a": 0.1, "b": 0.2})


def report_req(job: str, step: int) -> pb.ReportRequest:
    return pb.ReportRequest(job_id=job, epoch=0, step=step, count=8, stats=[
        pb.ModalityStats(modality="a", score_sum=4.0, fisher=0.1), pb.ModalityStats(modality="b", score_sum=2.0, fisher=0.2)])


def raw_report(target: str, req: pb.ReportRequest) -> tuple[grpc.StatusCode, str]:
    """One Report without the client's retries, with a deadline far beyond the store timeout:
    the server's own answer and its code."""
    with grpc.insecure_channel(target) as ch:
        try:
            pb_grpc.RegulatorStub(ch).Report(req, timeout=60.0)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


def serving(state: Path) -> RegulatorServer:
    limits = roomy_limits(store_timeout_s=STORE_TIMEOUT_S)
    return RegulatorServer(ServerConfig(port=0, metrics_port=None, state_dir=state, grace_seconds=1.0, limits=limits))


def hang_next_commit(srv: RegulatorServer) -> tuple[threading.Event, threading.Event]:
    """The next commit of the server's SQLite writer stops inside its transaction until the
    returned ``release`` is set, as on a disk frozen mid-commit (``entered``: it has stopped)."""
    writer = srv.store.inner._writer  # type: ignore[attr-defined]
    execute: Callable[..., None] = writer._execute
    entered, release = threading.Event(), threading.Event()

    def frozen(conn: sqlite3.Connection, batch: list) -> None:
        if not entered.is_set():
            entered.set()
            release.wait()
        execute(conn, batch)

    writer._execute = frozen
    return entered, release


@pytest.mark.e2e
def test_a_report_whose_own_commit_hangs_answers_unavailable_in_time_and_its_retry_is_answered_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with serving(state) as srv, RegulatorClient.connect(srv.target, timeout=60) as client:
        for job in ("job", "ref"):
            client.open_session(job, ["a", "b"], "official")
            client.report(job, attempt=0, epoch=0, step=0, **STATS)
        reference = client.report("ref", attempt=0, epoch=0, step=1, **STATS)  # the same step, never held
        entered, release = hang_next_commit(srv)
        try:
            # the lone Report's commit hangs: UNAVAILABLE at the store timeout, not the call's deadline
            code, msg = raw_report(srv.target, report_req("job", 1))
            assert entered.is_set()
            assert code == grpc.StatusCode.UNAVAILABLE, (code, msg)
            assert f"within {STORE_TIMEOUT_S:g}s" in msg and "still running" in msg, msg
            code, msg = raw_report(srv.target, report_req("job", 1))  # a retry while it hangs: no second try
            assert code == grpc.StatusCode.UNAVAILABLE and "has not completed" in msg, (code, msg)
        finally:
            release.set()  # the disk comes back: the held commit completes
        wait_until(lambda: "job" not in srv.manager.directory.in_doubt, "the held write is settled")
        again = client.report("job", attempt=0, epoch=0, step=1, **STATS)  # the client's retry
        assert again.duplicate and again.step == reference.step  # the stored answer, once
        assert client.report("job", attempt=0, epoch=0, step=1, **STATS).step == reference.step
        detail = client.get_session("job", include_steps=True)
        assert [s.step for s in detail.steps] == [0, 1] and detail.session.steps == 2
    with serving(state) as srv, RegulatorClient.connect(srv.target, timeout=60) as client:  # durable
        detail = client.get_session("job", include_steps=True)
        assert [s.step for s in detail.steps] == [0, 1]
        assert detail.steps[1] == reference.step


def test_a_corrupt_state_file_is_inspected_without_files_beside_it(tmp_path: Path) -> None:
    SQLiteStore(tmp_path).close()
    path = tmp_path / STATE_FILE
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE filler (x TEXT)")
    conn.executemany("INSERT INTO filler VALUES (?)", [("y" * 500,)] * 200)
    conn.commit()
    conn.close()
    assert not any(Path(f"{path}{side}").exists() for side in ("-wal", "-shm"))  # at rest: one file
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page: 3 * page + 200] = b"\x55" * 200  # a damaged page (the header is intact)
    path.write_bytes(bytes(data))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(StoreError, match="is corrupt"):
        SQLiteStore(tmp_path)
    assert sorted(os.listdir(tmp_path)) == before  # no -wal, no -shm
    assert path.read_bytes() == bytes(data)  # and the file byte for byte as it was


def _can_mount_read_only() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tempfile.mkdtemp()
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {probe} {probe} && mount -o remount,bind,ro {probe}"],
                              capture_output=True, timeout=30)
        return done.returncode == 0
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.skipif(not _can_mount_read_only(), reason="no user namespaces here to mount a read-only directory")
def test_a_read_only_state_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    SQLiteStore(state).close()
    serve = f"{sys.executable} -m regulator_cli serve --port 0 --metrics-port -1 --state-dir {state}"
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount --bind {state} {state} && mount -o remount,bind,ro {state} && exec {serve}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"state dir {state} is on a read-only file system" in lines[0] and "writable --state-dir" in lines[0]
