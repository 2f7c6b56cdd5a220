"""An open session's memory is bounded (issue 19, item 3): closed epochs beyond the newest two are
spilled (the store has them) and read back for GetSession, late ranks and resuming attempts, with
the same answers as a session that keeps them all; what cannot be spilled (the memory store) is
refused with RESOURCE_EXHAUSTED naming the budget, which the client treats like a shed call; a
long session under ``--memory-budget`` keeps the server's accounted memory within the budget and
its resident memory from growing with the epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from regulator_client import RegulatorClient
from regulator_client.errors import Overloaded, ResourceExhausted
from regulator_service.capacity.memory_budget import MemoryBudget, epoch_bytes
from regulator_service.client_api import RETRY_AFTER_KEY
from regulator_service.core.accounting import KEEP_CLOSED
from regulator_service.core.manager import SessionManager
from regulator_service.model import Limits, SessionKey
from regulator_service.storage import MemoryStore, SQLiteStore, StateStore
from regulator_service.wire.api import RegulatorAPI
from trainers.serverproc import ServerProcess

from .conftest import metric, scrape
from .postgres import Stores

NAMES = [f"m{i}" for i in range(4)]


def stats(step: int, names: list[str] = NAMES) -> dict[str, Any]:
    """A step's statistics; the Fisher values vary so that the paper profile's windows open and close."""
    return dict(count=8, score_sums={m: 1.0 + (step + i) % 5 for i, m in enumerate(names)},
                fisher={m: 0.05 + 0.01 * ((step * 7 + 3 * i) % 11) for i, m in enumerate(names)})


def run_epochs(client: RegulatorClient, job: str, first: int, last: int, attempt: int = 0) -> list[Any]:
    """Two steps and an EndEpoch per epoch; every answer."""
    out: list[Any] = []
    for epoch in range(first, last):
        for step in (2 * epoch, 2 * epoch + 1):
            out.append(client.report(job, attempt=attempt, epoch=epoch, step=step, **stats(step)))
        out.append(client.end_epoch(job, attempt=attempt, epoch=epoch))
    return out


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_spilled_epochs_give_the_answers_of_a_session_that_keeps_them_all(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    stores = Stores(backend, request, tmp_path)
    keeping = SessionManager(MemoryStore())  # a server's memory store: nothing to spill to, all kept
    spilling = SessionManager(stores.open())
    in_process = SessionManager(MemoryStore(in_budget=False))  # the client's in-process mode spills too
    managers = (keeping, spilling, in_process)
    clients = [RegulatorClient.in_process(RegulatorAPI(m)) for m in managers]

    def same(answers: list[Any]) -> bool:
        return all(a == answers[0] for a in answers[1:])

    try:
        answers = []
        for c in clients:
            c.open_session("job", NAMES, "paper")
            answers.append(run_epochs(c, "job", 0, 40))
        assert same(answers)
        assert any(w.open for a in answers[0] if isinstance(a, pb.EndEpochResponse) for w in a.next_window)
        held = [next(iter(m.directory.open.values())) for m in managers]
        assert [(s.closed_epoch_count, s.kept_epoch_count) for s in held] == [(40, 40)] + [(40, KEEP_CLOSED)] * 2
        # read back: GetSession (epochs of the first page, steps), a late rank's duplicate of a
        # spilled epoch's EndEpoch and Report, and an attempt resuming after epoch 30
        for c in clients:
            c.get_session("job", include_steps=True)  # fills the encoded-epoch cache ...
            run_epochs(c, "job", 40, 43)
        later = [c.get_session("job", include_steps=True, page_size=7) for c in clients]  # ... extended
        assert same([r.epochs for r in later]) and len(later[0].epochs) == 44
        assert same([r.steps for r in later]) and len(later[0].steps) == 86  # 7 a page
        late_end = [c.end_epoch("job", attempt=0, epoch=3) for c in clients]
        assert same(late_end) and late_end[0].duplicate
        late = [c.report("job", attempt=0, epoch=5, step=11, **stats(11)) for c in clients]
        assert same(late) and late[0].duplicate
        resumed = []
        for c in clients:
            c.open_session("job", NAMES, "paper", attempt=1, resume_epoch=30)
            resumed.append(run_epochs(c, "job", 30, 34, attempt=1))
        assert same(resumed)
        assert same([c.get_session("job", attempt=1).epochs for c in clients])
        key = SessionKey("job", 0)  # the store's range read, and the default every store inherits
        assert StateStore.closed_epochs(spilling._store, key, 5, 9) == spilling._store.closed_epochs(key, 5, 9)
        assert [e.epoch for e in spilling._store.closed_epochs(key, 5, 9)] == [5, 6, 7, 8, 9]
    finally:
        spilling.close_store()
    restarted = SessionManager(stores.open())  # a restart restores the open session spilled
    try:
        assert restarted.restore() == 1
        assert next(iter(restarted.directory.open.values())).kept_epoch_count == KEEP_CLOSED
        again = RegulatorClient.in_process(RegulatorAPI(restarted))
        assert again.get_session("job", attempt=1).epochs == clients[0].get_session("job", attempt=1).epochs
        assert run_epochs(again, "job", 34, 36, attempt=1) == run_epochs(clients[0], "job", 34, 36, attempt=1)
    finally:
        restarted.close_store()


def test_an_open_session_is_charged_for_its_traces_only_once_its_epochs_are_spilled(tmp_path: Path) -> None:
    m = len(NAMES)
    charged = {}
    for name, store in (("spilling", SQLiteStore(tmp_path)), ("keeping", MemoryStore())):
        manager = SessionManager(store)
        client = RegulatorClient.in_process(RegulatorAPI(manager))
        client.open_session("job", NAMES, "paper")
        run_epochs(client, "job", 0, 20)
        before = manager.budget.used("sessions")
        run_epochs(client, "job", 20, 80)
        charged[name] = manager.budget.used("sessions") - before
        manager.close_store()
    assert charged["spilling"] <= 60 * 8 * m * 2  # the trace values (arrays over-allocate a little)
    assert charged["keeping"] >= 60 * epoch_bytes(m)  # the memory store keeps (and counts) every epoch


def test_the_memory_store_refuses_at_the_budget_and_the_refused_call_changes_nothing() -> None:
    budget = MemoryBudget(1 << 20)
    manager = SessionManager(MemoryStore(), budget=budget)
    client = RegulatorClient.in_process(RegulatorAPI(manager))
    client.open_session("job", NAMES, "paper")
    calls = [(epoch, step) for epoch in range(100_000) for step in (2 * epoch, 2 * epoch + 1, None)]
    answered = 0  # calls answered before the refusal (None: the epoch's EndEpoch)

    def call(epoch: int, step: Any) -> Any:
        if step is None:
            return client.end_epoch("job", attempt=0, epoch=epoch)
        return client.report("job", attempt=0, epoch=epoch, step=step, **stats(step))

    with pytest.raises(ResourceExhausted, match=r"--memory-budget 1 MiB.*memory store") as refused:
        for epoch, step in calls:
            call(epoch, step)
            answered += 1
            assert budget.used() <= budget.limit
    assert getattr(refused.value, "retry_after_ms", 0) > 0  # a "retry later", not a quota
    assert budget.used() <= budget.limit and answered > 30
    before = client.get_session("job", include_steps=True)
    steps_answered = sum(1 for _, step in calls[:answered] if step is not None)
    assert (len(before.epochs) - 1, len(before.steps)) == (answered - steps_answered, steps_answered)
    budget.limit = 2 << 20  # room again (sessions closed, say): the refused call goes through, once
    first = call(*calls[answered])
    assert not getattr(first, "duplicate", False)
    for epoch, step in calls[answered + 1 : answered + 4]:
        call(epoch, step)
    after = client.get_session("job", include_steps=True)
    done = calls[: answered + 4]
    assert (len(after.epochs) - 1, len(after.steps)) == (sum(s is None for _, s in done), sum(s is not None for _, s in done))


def test_nothing_of_a_job_stays_once_its_session_leaves_memory(tmp_path: Path) -> None:
    """The issue's "~480 B per distinct job id never released" (with a GetSession per job): its
    history pages and encoded epochs are dropped with the session when it leaves the inactive cache."""
    manager = SessionManager(SQLiteStore(tmp_path), limits=Limits(inactive_cache=4))
    client = RegulatorClient.in_process(RegulatorAPI(manager))
    try:
        for i in range(40):
            job = f"job-{i}"
            client.open_session(job, NAMES, "paper")
            run_epochs(client, job, 0, 2)
            client.get_session(job, include_steps=True)
            client.close_session(job, attempt=0)
        pages = manager.history.pages
        held = {k[0] for k in pages._blocks} | {k[0] for k in pages._epochs}
        assert held <= set(manager.directory.inactive) and len(manager.directory.inactive) == 4
        assert set(pages._of_session) == {k[0] for k in pages._blocks}
        assert len(manager.memory._charged) == 4 and not manager.directory.latest
        assert client.get_session("job-0", include_steps=True).session.steps == 4  # read back on demand
    finally:
        manager.close_store()


@pytest.mark.e2e
def test_a_budget_refusal_reaches_a_grpc_client_as_a_shed_call() -> None:
    names = [f"modality-{i:02d}" for i in range(16)]
    with ServerProcess(None, extra_args=["--memory-budget", "1Mi"]) as server:
        with RegulatorClient.connect(server.target, timeout=1.0) as client:
            client.open_session("job", names, "paper")
            with pytest.raises(Overloaded, match="memory budget"):
                for epoch in range(2000):
                    client.report("job", attempt=0, epoch=epoch, step=epoch, **stats(epoch, names))
                    client.end_epoch("job", attempt=0, epoch=epoch)
            refused_epoch = epoch
            # the raw answer: RESOURCE_EXHAUSTED with the "retry later" key
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.RegulatorStub(channel)
                with pytest.raises(grpc.RpcError) as raw:
                    stub.EndEpoch(pb.EndEpochRequest(job_id="job", attempt=0, epoch=refused_epoch), timeout=30)
            assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--memory-budget" in raw.value.details()
            assert any(k == RETRY_AFTER_KEY for k, _ in raw.value.trailing_metadata())
        used = sum(metric(scrape(server.metrics_port), "inforeg_regulator_memory_used_bytes", part=p)  # type: ignore[arg-type]
                   for p in ("sessions", "answers", "history"))
        assert 0 < used <= 1 << 20


def rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024


@pytest.mark.e2e
def test_a_long_open_session_stays_within_the_budget(tmp_path: Path) -> None:
    """The issue's probe, shortened: one 16-modality session, a Report and an EndEpoch per epoch,
    under a budget small enough that its answers are evicted as they come; accounted memory stays
    within the budget and resident memory grows by far less than the epochs' summaries would take
    (6 KiB each before this fix) between epoch N and 3N."""
    names = [f"modality-{i:02d}" for i in range(16)]
    n = 400
    with ServerProcess(str(tmp_path / "state"), extra_args=["--memory-budget", "2Mi"]) as server:
        assert server.proc is not None
        with RegulatorClient.connect(server.target, timeout=30) as client:
            client.open_session("job", names, "paper")
            samples = {}
            for epoch in range(3 * n):
                client.report("job", attempt=0, epoch=epoch, step=epoch, **stats(epoch, names))
                client.end_epoch("job", attempt=0, epoch=epoch)
                if epoch + 1 in (n, 2 * n, 3 * n):
                    text = scrape(server.metrics_port)  # type: ignore[arg-type]
                    used = sum(metric(text, "inforeg_regulator_memory_used_bytes", part=p) for p in ("sessions", "answers", "history"))
                    samples[epoch + 1] = (rss(server.proc.pid), used)
            assert len(client.get_session("job").epochs) == 3 * n + 1  # every epoch read back
    assert all(used <= 2 << 20 for _, used in samples.values())
    grown = samples[3 * n][0] - samples[n][0]
    assert grown < n * epoch_bytes(16), (grown, samples)  # half what the 2n summaries alone took before
