"""Memory stays within the deployment's limit (issue 8, item 6): a memory budget over the
caches (sessions, answers, history pages), evicted before a new session is refused
(RESOURCE_EXHAUSTED), exported as gauges; step records of ended sessions pruned after a retention
period, their epochs and windows kept."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tracemalloc
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.errors import ResourceExhausted
from regulator_service.wire.api import RegulatorAPI
from regulator_service.core.manager import SessionManager
from regulator_service.capacity.memory_budget import (
    ANSWER_FLOOR,
    MemoryBudget,
    answer_bytes,
    epoch_bytes,
    parse_bytes,
)
from regulator_service.core.accounting import session_bytes
from regulator_service.model import EpochSummary, Fallback, Limits, SessionConfig, StepRecord
from regulator_service.policy import BUILTIN_PROFILES, Window
from regulator_service.core.session import Session
from regulator_service.storage import SQLiteStore
from trainers.serverproc import ServerProcess

from .conftest import scrape, wait_until

STATS: dict[str, Any] = dict(count=8, score_sums={"a": 6.0, "b": 2.0}, fisher={"a": 0.1, "b": 0.2})


def measured(make: Any, n: int) -> float:
    """Bytes per object that ``make()`` allocates and keeps, by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = [make(i) for i in range(n)]
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(kept) == n
    return (after - before) / n


@pytest.mark.parametrize("modalities", [2, 16])
def test_size_estimates_cover_what_the_caches_really_hold(modalities: int) -> None:
    names = tuple(f"m{i}" for i in range(modalities))
    cache: OrderedDict[int, StepRecord] = OrderedDict()

    def answer(i: int) -> StepRecord:  # as a session caches it: distinct floats, an OrderedDict entry
        r = StepRecord(epoch=i // 100, step=i, count=64, score_sums=tuple(i * 1.5 + k for k in range(modalities)),
                       fishers=tuple(i * 2.5 + k for k in range(modalities)), proximal=tuple(i * 3.5 + k for k in range(modalities)),
                       fallback=Fallback.NONE, digest=os.urandom(16))
        cache[i] = r
        return r

    assert answer_bytes(modalities) >= measured(answer, 2000)
    windows = tuple(Window(open=True, growth=0.5) for _ in names)
    assert epoch_bytes(modalities) >= measured(lambda i: EpochSummary.start(i, windows).close(), 500)
    profile = BUILTIN_PROFILES.get("paper").restore({})
    assert session_bytes(profile, modalities) >= measured(
        lambda i: Session.new(SessionConfig(f"job-{i:060d}", 0, 1, names, profile), 0), 200
    )


def test_parse_bytes_reads_kubernetes_quantities() -> None:
    assert parse_bytes("256Mi") == 256 << 20 and parse_bytes("1Gi") == 1 << 30 and parse_bytes("300M") == 300_000_000
    assert parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_caches_are_evicted_before_a_session_is_refused(tmp_path: Path) -> None:
    limit = 20 * session_bytes(BUILTIN_PROFILES.get("official").restore({}), 2) + 300 * answer_bytes(2)  # ~35 sessions with their answers trimmed
    budget = MemoryBudget(limit)
    # a store that is not in memory: evicted answers are re-read from it (the memory store keeps
    # them all, counted: tests/test_memory_open_sessions.py)
    manager = SessionManager(SQLiteStore(tmp_path), limits=Limits(max_open_sessions=1000), budget=budget)
    client = RegulatorClient.in_process(RegulatorAPI(manager))
    answers: dict[str, list[pb.ReportResponse]] = {}
    opened = 0
    with pytest.raises(ResourceExhausted, match="memory budget is full"):
        while opened < 100:
            job = f"job-{opened}"
            client.open_session(job, ["a", "b"], "official")
            opened += 1
            answers[job] = [client.report(job, attempt=0, epoch=0, step=s, **STATS) for s in range(150)]
            assert budget.used() <= limit  # after every call
    # refused only once the caches were given up: every open session keeps just a few answers
    assert 1 < opened < 100
    assert all(s.cached_answers <= ANSWER_FLOOR for s in manager.directory.open.values())
    assert budget.used("answers") <= opened * ANSWER_FLOOR * answer_bytes(2)
    # an evicted answer is still the same answer (read back from the store) for a late rank
    late = client.report("job-0", attempt=0, epoch=0, step=3, **STATS)
    assert late.duplicate and late.step == answers["job-0"][3].step
    client.close_session("job-0", attempt=0)
    client.close_session("job-1", attempt=0)
    client.open_session("after-closing", ["a", "b"], "official")  # room again
    manager.close_store()


@pytest.mark.e2e
def test_a_server_refuses_sessions_beyond_its_budget_and_exports_the_usage(tmp_path: Path) -> None:
    with ServerProcess(str(tmp_path / "state"), extra_args=["--memory-budget", "1Mi"]) as server:
        with RegulatorClient.connect(server.target, timeout=10) as client:
            with pytest.raises(ResourceExhausted, match="memory budget is full.*--memory-budget"):
                for i in range(200):
                    client.open_session(f"job-{i}", ["a", "b"], "official")
                    for step in range(20):
                        client.report(f"job-{i}", attempt=0, epoch=0, step=step, **STATS)
        text = scrape(server.metrics_port)  # type: ignore[arg-type]
    gauges = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("inforeg_regulator_memory_")}
    assert gauges["inforeg_regulator_memory_budget_bytes"] == 1 << 20
    parts = {k: v for k, v in gauges.items() if k.startswith("inforeg_regulator_memory_used_bytes")}
    assert set(parts) == {f'inforeg_regulator_memory_used_bytes{{part="{p}"}}' for p in ("sessions", "answers", "history")}
    assert 0 < sum(parts.values()) <= 1 << 20


@pytest.mark.e2e
def test_step_records_of_ended_sessions_are_pruned_after_the_retention_and_epochs_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with ServerProcess(str(state)) as server:  # the default retention (30 days): nothing pruned
        with RegulatorClient.connect(server.target, timeout=10) as client:
            for job in ("ended", "running"):
                client.open_session(job, ["a", "b"], "official")
                for step in range(30):
                    client.report(job, attempt=0, epoch=step // 10, step=step, **STATS)
                    if step % 10 == 9:
                        client.end_epoch(job, attempt=0, epoch=step // 10)
            client.close_session("ended", attempt=0)
            before = client.get_session("ended", include_steps=True)
            running = client.get_session("running", include_steps=True)
    assert len(before.steps) == 30 and not before.steps_pruned_unix_ms
    env = {**os.environ}
    with ServerProcess(str(state), extra_args=["--step-retention", "1"]) as server:
        env["REGULATOR_TARGET"] = server.target
        with RegulatorClient.connect(server.target, timeout=10) as client:
            wait_until(lambda: client.get_session("ended").steps_pruned_unix_ms > 0, "the ended session's steps are pruned")
            after = client.get_session("ended", include_steps=True)
            assert list(after.steps) == []
            assert list(after.epochs) == list(before.epochs)  # traces, windows, summaries kept
            assert after.session.steps == 30 and after.session.last_step == 29
            assert client.get_session("running", include_steps=True) == running  # open: untouched
        done = subprocess.run([sys.executable, "-m", "regulator_cli", "export", "ended", "-o", str(tmp_path / "x.jsonl")],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 1 and "were pruned" in done.stderr and "--what epochs" in done.stderr
        done = subprocess.run([sys.executable, "-m", "regulator_cli", "export", "ended", "--what", "epochs", "-o", "-"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0 and len(done.stdout.splitlines()) == 4  # 3 closed epochs and the open one
        assert json.loads(done.stdout.splitlines()[0])["steps"] == 10
    with ServerProcess(str(state)) as again:  # and so it stays after a restart
        with RegulatorClient.connect(again.target, timeout=10) as client:
            kept = client.get_session("ended", include_steps=True)
            assert list(kept.steps) == [] and kept.steps_pruned_unix_ms == after.steps_pruned_unix_ms
            assert list(kept.epochs) == list(before.epochs) and kept.session == after.session
