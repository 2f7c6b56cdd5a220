"""Readers never starve writers, part one (issue 8, item 3): GetSession pages the steps (a
server maximum per page, a continuation token), the client and the CLI page through
transparently, and the pages are cut from encoded blocks (``history.py``).

The long histories are written straight into a real state file with the store's own API (a
62,000-step job through Reports would take a minute), then served by a real `regulator serve`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from regulator_client import RegulatorClient
from regulator_service.capacity import history
from regulator_service.model import EpochSummary, Fallback, SessionConfig, SessionKey, SessionStatus, StepRecord
from regulator_service.policy import BUILTIN_PROFILES, Window
from regulator_service.storage import MemoryStore, SQLiteStore
from trainers.serverproc import ServerProcess

from .postgres import Stores

OPEN = (Window(open=True, growth=0.5), Window(open=False, growth=float("nan")))


def seed(store: Any, job: str, steps: int, epoch_len: int = 100, first_step: int = 0,
         modalities: tuple[str, ...] = ("audio", "visual"), close: bool = True) -> None:
    """A job of ``steps`` steps in ``store`` (its epochs closed every ``epoch_len``), written
    through the store's API; into SQLite as one transaction (62,000 commits would take a while)."""
    rng = random.Random(steps)
    now = int(time.time() * 1000)
    config = SessionConfig(job, 0, 1, modalities, BUILTIN_PROFILES.get("none").restore({}))
    windows = OPEN[: len(modalities)] if len(modalities) == 2 else tuple(OPEN[0] for _ in modalities)
    store.create_session(config, now, windows)
    records = [
        StepRecord(
            epoch=i // epoch_len, step=first_step + i, count=64,
            score_sums=tuple(64 * rng.random() for _ in modalities), fishers=tuple(rng.random() * 1e-4 for _ in modalities),
            proximal=tuple(rng.random() for _ in modalities), fallback=Fallback.NONE, digest=rng.randbytes(16),
        )
        for i in range(steps)
    ]
    epochs = []  # closed epochs: their summaries (sums over their steps)
    for e in range(steps // epoch_len):
        summary = EpochSummary.start(e, windows)
        for r in records[e * epoch_len : (e + 1) * epoch_len]:
            summary = summary.add(r)
        epochs.append(summary.close())
    if isinstance(store, SQLiteStore):
        from regulator_service.storage import codec
        from regulator_service.storage.group_commit import WriteOp

        def bulk(conn: Any) -> None:
            conn.executemany("INSERT INTO steps (job_id, attempt, step, epoch, record, at_ms) VALUES (?,?,?,?,?,?)",
                             [(job, 0, r.step, r.epoch, codec.step_to_json(r), now) for r in records])
            conn.executemany("INSERT INTO epochs VALUES (?,?,?,?)", [(job, 0, e.epoch, codec.epoch_to_json(e)) for e in epochs])
            conn.execute("UPDATE sessions SET open_epoch=? WHERE job_id=? AND attempt=0", (len(epochs), job))

        store._writer.submit(WriteOp(fn=bulk), timeout_s=300)
    elif type(store).__name__ == "PostgreSQLStore":
        from regulator_service.storage import codec
        from regulator_service.storage.pg_ops import PgOp

        def pg_bulk(conn: Any) -> None:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO steps (job_id, attempt, step, epoch, record, at_ms) VALUES (%s,%s,%s,%s,%s,%s)",
                                [(job, 0, r.step, r.epoch, codec.step_to_json(r), now) for r in records])
                cur.executemany("INSERT INTO epochs VALUES (%s,%s,%s,%s)", [(job, 0, e.epoch, codec.epoch_to_json(e)) for e in epochs])
            conn.execute("UPDATE sessions SET open_epoch=%s WHERE job_id=%s AND attempt=0", (len(epochs), job))

        store._writer.submit(PgOp(fn=pg_bulk), timeout_s=300)
    else:
        it = iter(epochs)
        for r in records:
            store.append_step(config.key, r, now)
            if (r.step - first_step + 1) % epoch_len == 0:
                e = next(it)
                store.close_epoch(config.key, e, e.epoch + 1, windows, now)
    if close:
        store.set_status(config.key, SessionStatus.CLOSED, now)


def stub_call(target: str, req: pb.GetSessionRequest) -> pb.GetSessionResponse:
    with grpc.insecure_channel(target) as ch:  # gRPC's default 4 MiB receive limit
        return pb_grpc.RegulatorStub(ch).GetSession(req, timeout=60)


@pytest.mark.e2e
def test_a_history_beyond_grpcs_message_limit_pages_through_the_client_and_the_cli(tmp_path: Path) -> None:
    """62,000 steps (the issue's 4 MB mark): no page is near the limit, the client merges the
    pages, `regulator export` streams them into a trace, `regulator show --steps` prints them."""
    state = tmp_path / "state"
    store = SQLiteStore(state)
    seed(store, "long", 62_000)
    store.close()
    with ServerProcess(str(state)) as server:
        # an older client, that knows nothing of paging, gets the first page and the total
        first = stub_call(server.target, pb.GetSessionRequest(job_id="long", include_steps=True))
        assert len(first.steps) == history.MAX_PAGE_STEPS and first.next_page_token
        assert first.session.steps == 62_000 and len(first.epochs) == 621
        assert len(first.SerializeToString()) <= history.MAX_PAGE_BYTES + 200_000  # + header and epochs
        with RegulatorClient.connect(server.target, timeout=60) as client:  # no raised receive limit
            detail = client.get_session("long", include_steps=True)
            assert [s.step for s in detail.steps] == list(range(62_000))
            assert not detail.next_page_token and len(detail.epochs) == 621
            assert sum(1 for _ in client.steps("long", page_size=5_000)) == 62_000
        env = {"REGULATOR_TARGET": server.target}
        out = tmp_path / "long.jsonl"
        done = subprocess.run([sys.executable, "-m", "regulator_cli", "export", "long", "-o", str(out)],
                              capture_output=True, text=True, timeout=300, env={**_env(), **env})
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        steps = [x for x in lines if x["type"] == "step"]
        assert [x["step"] for x in steps] == list(range(62_000))
        assert [x["epoch"] for x in lines if x["type"] == "epoch_end"] == list(range(620))
        assert [x["proximal"] for x in steps[:3]] == [
            {m.modality: m.factors.proximal for m in s.modalities} for s in detail.steps[:3]
        ]
        shown = subprocess.run([sys.executable, "-m", "regulator_cli", "show", "long", "--steps"],
                               capture_output=True, text=True, timeout=300, env={**_env(), **env})
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count("\n") > 62_000


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_pages_cover_the_history_once_with_the_epochs_on_the_first_page(stores: Stores) -> None:
    store = stores.open()
    seed(store, "job", 2_345, epoch_len=100, close=False)
    client = RegulatorClient.in_process(_api(store))
    pages = list(client.session_pages("job", page_size=700))
    assert [len(p.steps) for p in pages] == [700, 700, 700, 245]
    assert [len(p.epochs) for p in pages] == [24, 0, 0, 0]  # 23 closed and the open one, once
    assert all(p.session.steps == 2_345 for p in pages)
    assert [s.step for p in pages for s in p.steps] == list(range(2_345))
    assert not pages[-1].next_page_token
    whole = client.get_session("job", include_steps=True)  # page_size 0: the server's maximum
    assert list(whole.steps) == [s for p in pages for s in p.steps]
    assert client.get_session("job", include_steps=True) == whole  # again, from the cached blocks
    store.close()


def test_page_tokens_and_sizes_are_checked(tmp_path: Path) -> None:
    from regulator_client.errors import InvalidArgument

    store = MemoryStore()
    seed(store, "job", 50)
    client = RegulatorClient.in_process(_api(store))
    token = next(iter(client.session_pages("job", page_size=10))).next_page_token
    cases = [
        (pb.GetSessionRequest(job_id="job", include_steps=True, page_token="not-a-token"), "not a token"),
        (pb.GetSessionRequest(job_id="job", include_steps=True, page_token=token, attempt=3), "belongs to attempt 0"),
        (pb.GetSessionRequest(job_id="job", page_token=token), "set include_steps"),
        (pb.GetSessionRequest(job_id="job", include_steps=True, page_size=-1), "page_size must be >= 0"),
    ]
    for req, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            client.transport.get_session(req)


def test_an_amended_step_shows_in_pages_read_after_it(tmp_path: Path) -> None:
    """A late fallback report rewrites a recorded step of the open epoch: cached pages of that
    session are not served any more."""
    client = RegulatorClient.in_process()
    client.open_session("job", ["a", "b"], "official")
    stats: dict[str, Any] = dict(count=8, score_sums={"a": 6.0, "b": 2.0}, fisher={"a": 0.1, "b": 0.2})
    for step in range(30):
        client.report("job", attempt=0, epoch=0, step=step, **stats)
    before = client.get_session("job", include_steps=True)
    assert before.steps[5].fallback == pb.FALLBACK_UNSPECIFIED
    client.report("job", attempt=0, epoch=0, step=5, fallback=pb.FALLBACK_NEUTRAL, **stats)  # it was applied neutral
    after = client.get_session("job", include_steps=True)
    assert after.steps[5].fallback == pb.FALLBACK_NEUTRAL
    assert [s for i, s in enumerate(after.steps) if i != 5] == [s for i, s in enumerate(before.steps) if i != 5]


def test_pages_stay_under_the_byte_cap_and_jump_over_gaps() -> None:
    """16 modalities with 64-character names: 10,000 steps would be ~18 MB, a page stays under
    2 MiB; a resumed attempt whose steps start at 1,000,000 is found without scanning 1,000
    empty blocks."""
    mods = tuple(f"{'m' * 61}{i:03d}" for i in range(16))
    store = MemoryStore()
    seed(store, "wide", 3_000, first_step=1_000_000, modalities=mods)
    key = SessionKey("wide", 0)
    loads: list[tuple[int, int]] = []

    def load(first: int, last: int, limit: int) -> list[StepRecord]:
        loads.append((first, last))
        return store.step_range(key, first, last, limit)

    from regulator_service.wire.convert import step_record

    pages = history.HistoryPages()
    encode = lambda r: step_record(mods, r).SerializeToString()  # noqa: E731
    got, start, sizes = [], 0, []
    while True:
        page = pages.page(key, 0, 1_002_999, start, history.MAX_PAGE_STEPS, load, encode)
        sizes.append(len(page.data))
        msg = pb.GetSessionResponse.FromString(page.data)
        got += [s.step for s in msg.steps]
        if page.next_step is None:
            break
        start = page.next_step
    assert got == list(range(1_000_000, 1_003_000))
    assert max(sizes) <= history.MAX_PAGE_BYTES and len(sizes) > 1
    assert len(loads) < 20, loads


def _api(store: Any) -> Any:
    from regulator_service.wire.api import RegulatorAPI
    from regulator_service.core.manager import SessionManager

    manager = SessionManager(store)
    manager.restore()
    return RegulatorAPI(manager)


def test_the_first_page_leaves_room_for_a_long_epoch_list() -> None:
    """Epochs come whole on the first page; with many epochs of many modalities the first page
    carries fewer steps, so that the answer stays within the page's byte cap."""
    mods = tuple(f"{'m' * 61}{i:03d}" for i in range(16))
    store = MemoryStore()
    seed(store, "wide", 6_000, epoch_len=10, modalities=mods)  # 600 closed epochs of 16 modalities
    client = RegulatorClient.in_process(_api(store))
    pages = list(client.session_pages("wide"))
    first = pages[0]
    assert len(first.epochs) == 601
    assert len(first.SerializeToString()) <= history.MAX_PAGE_BYTES
    assert 0 < len(first.steps) < len(pages[1].steps)
    assert [s.step for p in pages for s in p.steps] == list(range(6_000))
