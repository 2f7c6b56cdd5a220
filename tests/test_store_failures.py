"""A hung or full disk (issue 8, item 5): store calls are bounded in time (UNAVAILABLE, never a
stall), one job's stuck write never holds up another job, health is NOT_SERVING while the store
fails and SERVING again once it recovers (liveness stays SERVING: a restart cures none of
these), and a full disk says "disk full".

The hung store is another process holding SQLite's write lock on the real file; the full disk
is a real 2 MiB tmpfs where the machine allows mounting one in a user namespace
(``unshare -rm``), and everywhere SQLite's own page limit (``--debug-max-state-bytes``: the same
SQLITE_FULL). A disk that hangs inside a commit cannot be made without root, so that case (a
write whose outcome is unknown) is driven in-process through a real SQLite store whose commit is
held up on purpose."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

import grpc
import pytest
from grpc_health.v1 import health_pb2

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from regulator_client import RegulatorClient
from regulator_client.errors import Unavailable
from regulator_service.wire.api import RegulatorAPI
from regulator_service.core.manager import SessionManager
from regulator_service.model import Limits, SessionKey
from regulator_service.edge.server import LIVENESS_NAME
from regulator_service.storage import SQLiteStore, StoreError
from regulator_service.storage.group_commit import WriteOp
from regulator_service.storage.sqlite import STATE_FILE
from trainers.serverproc import ServerProcess

from .conftest import health, scrape, wait_until

NOT_SERVING, SERVING = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING


def report_req(job: str, step: int, attempt: int = 0) -> pb.ReportRequest:
    return pb.ReportRequest(
        job_id=job, attempt=attempt, epoch=0, step=step, count=8,
        stats=[pb.ModalityStats(modality="a", score_sum=4.0, fisher=0.1), pb.ModalityStats(modality="b", score_sum=2.0, fisher=0.2)],
    )


def raw_call(target: str, method: str, req: Any, timeout: float = 30.0) -> tuple[grpc.StatusCode, str]:
    """One call without the client's retries: the server's own answer, and its code."""
    with grpc.insecure_channel(target) as ch:
        try:
            getattr(pb_grpc.RegulatorStub(ch), method)(req, timeout=timeout)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


def open_req(job: str) -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(job_id=job, modalities=["a", "b"], profile=pb.Profile(official=pb.OfficialProfile()))


@pytest.mark.e2e
def test_a_locked_store_answers_unavailable_in_time_and_other_jobs_are_not_held_up(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "server.log"
    with ServerProcess(str(state), log_path=str(log), extra_args=["--store-timeout", "2"]) as server:
        t = server.target
        assert raw_call(t, "OpenSession", open_req("stuck"))[0] == grpc.StatusCode.OK
        assert raw_call(t, "Report", report_req("stuck", 0))[0] == grpc.StatusCode.OK
        holder = sqlite3.connect(state / STATE_FILE, isolation_level=None, timeout=0)
        holder.execute("BEGIN IMMEDIATE")  # another process now holds the write lock: writes hang
        try:
            # a write answers UNAVAILABLE (not the client's 30 s deadline), naming the cause
            code, msg = raw_call(t, "Report", report_req("stuck", 1))
            assert code == grpc.StatusCode.UNAVAILABLE, (code, msg)
            assert "within 2s" in msg and "nothing was changed" in msg
            # another job's calls are bounded too: reads answer, writes say UNAVAILABLE in time
            code, _ = raw_call(t, "ListSessions", pb.ListSessionsRequest(include_inactive=True))
            assert code == grpc.StatusCode.OK
            assert raw_call(t, "GetSession", pb.GetSessionRequest(job_id="stuck", include_steps=True))[0] == grpc.StatusCode.OK
            assert raw_call(t, "OpenSession", open_req("other"))[0] == grpc.StatusCode.UNAVAILABLE
            wait_until(lambda: health(t) == NOT_SERVING, "health is NOT_SERVING while the store is locked")
            assert health(t, LIVENESS_NAME) == SERVING, "a locked store is no reason to restart the regulator"
            assert "inforeg_regulator_state_store_healthy 0.0" in scrape(server.metrics_port)  # type: ignore[arg-type]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        wait_until(lambda: health(t) == SERVING, "health is SERVING again once the lock is released")
        assert raw_call(t, "Report", report_req("stuck", 1))[0] == grpc.StatusCode.OK
        assert raw_call(t, "OpenSession", open_req("other"))[0] == grpc.StatusCode.OK
        with RegulatorClient.connect(t) as client:
            assert [s.step for s in client.get_session("stuck", include_steps=True).steps] == [0, 1]
    assert "locked by another process" in log.read_text()


def fill_until_full(target: str, job: str) -> tuple[int, str]:
    """Reports until a write fails; (steps answered, the failure's message)."""
    assert raw_call(target, "OpenSession", open_req(job))[0] == grpc.StatusCode.OK
    for step in range(20000):
        code, msg = raw_call(target, "Report", report_req(job, step))
        if code != grpc.StatusCode.OK:
            assert code == grpc.StatusCode.UNAVAILABLE, (code, msg)
            return step, msg
    raise AssertionError("the store never filled up")


@pytest.mark.e2e
def test_a_full_database_says_disk_full_and_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with ServerProcess(str(state), extra_args=["--debug-max-state-bytes", "96Ki"]) as server:
        answered, msg = fill_until_full(server.target, "full")
        assert "disk full" in msg and "no transaction is active" not in msg, msg
        wait_until(lambda: health(server.target) == NOT_SERVING, "health is NOT_SERVING on a full disk")
        assert health(server.target, LIVENESS_NAME) == SERVING, "a restart cannot empty a disk"
        with RegulatorClient.connect(server.target) as client:
            detail = client.get_session("full", include_steps=True)
        assert detail.session.steps == answered  # the refused step left nothing behind
        assert [s.step for s in detail.steps] == list(range(answered))


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tempfile.mkdtemp()
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                              capture_output=True, timeout=30)
        return done.returncode == 0
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.skipif(not can_mount_tmpfs(), reason="no user namespaces here to mount a small tmpfs (the page-limit test covers SQLITE_FULL)")
def test_a_full_disk_says_disk_full_and_serving_resumes_once_space_is_freed(tmp_path: Path) -> None:
    """A real 2 MiB file system: filled by another file, then freed."""
    mnt, ready = tmp_path / "mnt", tmp_path / "ready.json"
    mnt.mkdir()
    serve = (f"{sys.executable} -m regulator_cli serve --port 0 --metrics-port -1 --store-timeout 1 "
             f"--state-dir {mnt}/state --ready-file {ready}")
    proc = subprocess.Popen(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=2m tmpfs {mnt} && exec {serve}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(ready.exists, "the server in its own mount namespace serves")
        import json

        target = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
        inside = Path(f"/proc/{proc.pid}/root") / str(mnt).lstrip("/")  # the tmpfs, as the server sees it
        assert raw_call(target, "OpenSession", open_req("job"))[0] == grpc.StatusCode.OK
        filler = inside / "filler"
        with open(filler, "wb") as f:  # another tenant of the disk takes every free byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        answered, msg = 0, ""
        for step in range(20000):
            code, msg = raw_call(target, "Report", report_req("job", step))
            if code != grpc.StatusCode.OK:
                break
            answered += 1
        assert "disk full" in msg, msg
        wait_until(lambda: health(target) == NOT_SERVING, "health is NOT_SERVING on the full disk")
        assert health(target, LIVENESS_NAME) == SERVING, "a restart cannot empty a disk"
        filler.unlink()
        wait_until(lambda: health(target) == SERVING, "health is SERVING again once space is free")
        assert raw_call(target, "Report", report_req("job", answered))[0] == grpc.StatusCode.OK
        with RegulatorClient.connect(target) as client:
            assert [s.step for s in client.get_session("job", include_steps=True).steps] == list(range(answered + 1))
    finally:
        proc.terminate()
        proc.wait(30)


class HeldStore(SQLiteStore):
    """A real SQLite store whose next append is committed by a batch that hangs until
    ``release`` is set, as on a disk that stops answering in the middle of a commit."""

    def __init__(self, state_dir: Path, timeout_s: float) -> None:
        super().__init__(state_dir, timeout_s=timeout_s)
        self.hold = threading.Event()
        self.release = threading.Event()

    def append_step(self, key: SessionKey, record: Any, at_ms: int, filled: Any = None) -> None:
        if not self.hold.is_set():
            return super().append_step(key, record, at_ms, filled)
        self.hold.clear()
        writer = self._writer
        # another connection holds the write lock, so the next leader waits in BEGIN until this
        # append has queued behind it; then it takes both, and hangs inside the commit
        locker = sqlite3.connect(self.path, isolation_level=None, timeout=0, check_same_thread=False)
        locker.execute("BEGIN IMMEDIATE")
        leader = threading.Thread(target=lambda: writer.submit(WriteOp(fn=lambda c: self.release.wait()), timeout_s=120))
        leader.start()
        wait_until(lambda: len(writer._queue) == 1, "the leader waits for the write lock")

        def unlock() -> None:
            wait_until(lambda: len(writer._queue) == 2, "the append queued behind the leader")
            locker.execute("ROLLBACK")
            locker.close()

        threading.Thread(target=unlock).start()
        super().append_step(key, record, at_ms, filled)


def test_a_write_of_unknown_outcome_blocks_only_its_job_until_it_is_settled(tmp_path: Path) -> None:
    store = HeldStore(tmp_path, timeout_s=2.0)
    manager = SessionManager(store, limits=Limits(store_timeout_s=2.0))
    manager.restore()
    client = RegulatorClient.in_process(RegulatorAPI(manager))
    for job in ("hung", "other"):
        client.open_session(job, ["a", "b"], "official")
    stats: dict[str, Any] = dict(count=8, score_sums={"a": 4.0, "b": 2.0}, fisher={"a": 0.1, "b": 0.2})
    client.report("hung", attempt=0, epoch=0, step=0, **stats)
    store.hold.set()
    with pytest.raises(Unavailable, match="still running"):
        client.report("hung", attempt=0, epoch=0, step=1, **stats)
    assert "running for" in (manager.store_health() or "")
    with pytest.raises(Unavailable, match="has not completed"):  # its job waits for the outcome
        client.report("hung", attempt=0, epoch=0, step=1, **stats)
    with pytest.raises(Unavailable, match="nothing was changed"):  # the others are bounded too
        client.report("other", attempt=0, epoch=0, step=0, **stats)
    store.release.set()  # the disk comes back: the held batch (with step 1) commits
    wait_until(lambda: "hung" not in manager.directory.in_doubt, "the job's pending write is settled")
    # step 1 was committed after all: the job is re-read from the store and a retry is a duplicate
    again = client.report("hung", attempt=0, epoch=0, step=1, **stats)
    assert again.duplicate
    assert client.get_session("hung").session.steps == 2
    client.report("other", attempt=0, epoch=0, step=0, **stats)
    assert manager.store_health(probe=True) is None
    store.close()


def queued(writer: Any, submit: Any, n: int) -> list[threading.Thread]:
    """``n`` threads, thread k calling ``submit(k)``, started and seen waiting in the writer's queue."""
    threads = [threading.Thread(target=submit, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    wait_until(lambda: len(writer._queue) == n, f"{n} ops queued behind the running commit")
    return threads


def held_commit(tmp_path: Path) -> tuple[SQLiteStore, threading.Event, threading.Thread]:
    """A real SQLite store with a table ``t`` whose group-commit writer is inside a commit that
    waits for the returned gate: ops submitted meanwhile queue for the next transaction."""
    store = SQLiteStore(tmp_path, timeout_s=30)
    conn = sqlite3.connect(tmp_path / STATE_FILE)
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    gate = threading.Event()
    first = threading.Thread(target=lambda: store._writer.submit(WriteOp(fn=lambda c: gate.wait())))
    first.start()
    wait_until(lambda: store._writer._busy_since is not None, "the first commit is running")
    return store, gate, first


def test_group_commit_shares_one_transaction_and_a_bad_op_fails_alone(tmp_path: Path) -> None:
    """Ops queued while a commit runs share the next transaction; one whose statement fails
    (here: a step recorded twice) fails alone and the others commit."""
    store, gate, first = held_commit(tmp_path)
    writer = store._writer
    results: dict[int, Optional[BaseException]] = {}

    def put(k: int) -> None:
        try:
            writer.submit(WriteOp([("INSERT INTO t VALUES (?)", (k % 15,), 1)]))
            results[k] = None
        except StoreError as exc:
            results[k] = exc

    threads = queued(writer, put, 16)  # 0 and 15: the same row
    commits_before = writer.commits
    gate.set()
    for th in threads + [first]:
        th.join()
    failed = [k for k, e in results.items() if e is not None]
    assert len(failed) == 1 and failed[0] in (0, 15)
    assert "UNIQUE" in str(results[failed[0]])
    conn = sqlite3.connect(tmp_path / STATE_FILE)
    assert sorted(k for (k,) in conn.execute("SELECT k FROM t")) == list(range(15))
    conn.close()
    # the first commit, then one batch of 16 that failed on the duplicate and was re-run op by op
    assert writer.commits - commits_before == 1 + 15
    store.close()


def test_sixteen_queued_writes_commit_together(tmp_path: Path) -> None:
    store, gate, first = held_commit(tmp_path)
    writer = store._writer
    threads = queued(writer, lambda k: writer.submit(WriteOp([("INSERT INTO t VALUES (?)", (k,), 1)])), 16)
    before = writer.commits
    gate.set()
    for th in threads + [first]:
        th.join()
    assert writer.commits - before == 2  # the running one, then all 16 in one transaction
    store.close()
