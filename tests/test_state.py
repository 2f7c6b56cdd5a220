"""Session manager and stores: restart recovery, atomic durable points, schema handling."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.trace import TraceEpochEnd, read_trace
from regulator_service.wire.api import RegulatorAPI
from regulator_service.errors import Unavailable
from regulator_service.core.manager import SessionManager
from regulator_service.model import SessionKey
from regulator_service.storage import MemoryStore, SQLiteStore, StoreError
from regulator_service.storage.sqlite import STATE_FILE

from .conftest import data_file
from .postgres import Stores


def api_for(store) -> RegulatorAPI:  # type: ignore[no-untyped-def]
    manager = SessionManager(store)
    manager.restore()
    return RegulatorAPI(manager)


def feed(client: RegulatorClient, job: str, profile: str, stop_after: int | None = None) -> None:
    header, events = read_trace(data_file("trace_pix+mor_seed0.jsonl"))
    client.open_session(job, header.modalities, profile)
    for i, ev in enumerate(events):
        if stop_after is not None and i >= stop_after:
            return
        if isinstance(ev, TraceEpochEnd):
            client.end_epoch(job, attempt=0, epoch=ev.epoch)
        else:
            client.report(job, attempt=0, epoch=ev.epoch, step=ev.step, count=ev.count,
                          score_sums=ev.score_sum, fisher=ev.fisher)


def snapshot(client: RegulatorClient) -> list[bytes]:
    out = [client.transport.list_sessions(pb.ListSessionsRequest(include_inactive=True)).SerializeToString(deterministic=True)]
    for s in client.list_sessions(include_inactive=True):
        out.append(client.get_session(s.job_id, s.attempt, include_steps=True).SerializeToString(deterministic=True))
    return out


def test_restart_restores_every_session_exactly(stores: Stores) -> None:
    store = stores.open()
    client = RegulatorClient.in_process(api_for(store))
    feed(client, "done", "official")
    client.close_session("done", attempt=0)
    feed(client, "mid-epoch", "paper", stop_after=500)  # stops inside an epoch
    client.open_session("superseded", ["a", "b"], "none")
    client.open_session("superseded", ["a", "b"], "none", attempt=3)
    before = snapshot(client)
    store.close()

    store2 = stores.open()
    client2 = RegulatorClient.in_process(api_for(store2))
    assert snapshot(client2) == before
    # and it continues exactly where the uninterrupted run would have been
    header, events = read_trace(data_file("trace_pix+mor_seed0.jsonl"))
    ev = events[500]
    resp = client2.report("mid-epoch", attempt=0, epoch=ev.epoch, step=ev.step, count=ev.count,
                          score_sums=ev.score_sum, fisher=ev.fisher)
    reference = RegulatorClient.in_process()
    feed(reference, "mid-epoch", "paper", stop_after=500)
    want = reference.report("mid-epoch", attempt=0, epoch=ev.epoch, step=ev.step, count=ev.count,
                            score_sums=ev.score_sum, fisher=ev.fisher)
    assert resp == want
    # a duplicate from before the restart (older than the in-memory cache) still gets its answer
    first = events[0]
    dup = client2.report("mid-epoch", attempt=0, epoch=first.epoch, step=first.step, count=first.count,
                         score_sums=first.score_sum, fisher=first.fisher)
    assert dup.duplicate


class FailingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def append_step(self, key: SessionKey, record, at_ms: int) -> None:  # type: ignore[no-untyped-def]
        if self.fail:
            raise StoreError("disk full")
        super().append_step(key, record, at_ms)

    def close_epoch(self, *args) -> None:  # type: ignore[no-untyped-def]
        if self.fail:
            raise StoreError("disk full")
        super().close_epoch(*args)


def test_failed_write_changes_nothing_and_is_unavailable() -> None:
    store = FailingStore()
    client = RegulatorClient.in_process(api_for(store))
    feed(client, "j", "official", stop_after=10)
    before = snapshot(client)
    store.fail = True
    with pytest.raises(Unavailable, match="nothing was changed"):
        client.report("j", attempt=0, epoch=0, step=10, count=64, score_sums={"pix": 1.0, "mor": 2.0}, fisher={"pix": 1.0, "mor": 1.0})
    with pytest.raises(Unavailable):
        client.end_epoch("j", attempt=0, epoch=0)
    assert snapshot(client) == before
    store.fail = False  # the retry succeeds and counts once
    client.report("j", attempt=0, epoch=0, step=10, count=64, score_sums={"pix": 1.0, "mor": 2.0}, fisher={"pix": 1.0, "mor": 1.0})
    assert client.get_session("j").session.steps == 11


class UnreadableStore(MemoryStore):
    """Its step reads fail (a disk that errors on read) while ``fail_reads`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_reads = False

    def get_step(self, key: SessionKey, step: int):  # type: ignore[no-untyped-def]
        if self.fail_reads:
            raise StoreError("disk I/O error")
        return super().get_step(key, step)


def test_a_failed_store_read_in_report_is_unavailable_not_internal() -> None:
    """A Report that must read the store (a retried step whose answer is no longer cached) and
    cannot gets UNAVAILABLE, which clients retry, never INTERNAL; nothing changes."""
    store = UnreadableStore()
    feed(RegulatorClient.in_process(api_for(store)), "j", "official")  # 1,250 steps: more than a session caches
    client = RegulatorClient.in_process(api_for(store))  # a restart: step 0's answer is only in the store
    before = snapshot(client)
    header, events = read_trace(data_file("trace_pix+mor_seed0.jsonl"))
    first = events[0]
    retry = dict(attempt=0, epoch=first.epoch, step=first.step, count=first.count, score_sums=first.score_sum, fisher=first.fisher)
    store.fail_reads = True
    with pytest.raises(Unavailable, match="state store read failed: disk I/O error"):
        client.report("j", **retry)
    store.fail_reads = False
    assert snapshot(client) == before
    assert client.report("j", **retry).duplicate  # the retry gets the stored answer


def test_unknown_schema_version_is_refused_untouched(tmp_path: Path) -> None:
    SQLiteStore(tmp_path).close()
    path = tmp_path / STATE_FILE
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    raw = path.read_bytes()
    with pytest.raises(StoreError, match="schema version 99"):
        SQLiteStore(tmp_path)
    assert path.read_bytes() == raw


def test_corrupt_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        SQLiteStore(tmp_path)
    assert path.read_bytes() == b"this is not a database" * 100
