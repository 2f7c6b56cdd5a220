"""Deferred Fisher values (ModalityStats.fisher_deferred + MeasuredFisher): the regulator records
exactly the history a client that sends every value up front produces, persists a pending step
across restarts, and rejects every inconsistent use with the right code, changing nothing."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from regulator_client.trace import TraceEpochEnd, TraceStep, read_trace
from regulator_service.wire.api import RegulatorAPI
from regulator_service.core.manager import SessionManager

from .conftest import data_file
from .postgres import Stores

JOB = "deferred"


def api_for(store: Any) -> RegulatorAPI:
    manager = SessionManager(store)
    manager.restore()
    return RegulatorAPI(manager)


def history(client: RegulatorClient, job: str = JOB) -> bytes:
    detail = client.get_session(job, include_steps=True)
    detail.session.created_unix_ms = detail.session.last_active_unix_ms = 0
    detail.session.job_id = ""
    return detail.SerializeToString(deterministic=True)


def feed_immediate(client: RegulatorClient, trace: str, profile: str, job: str) -> list[dict]:
    """What an older client does: every Fisher value with its own step's report."""
    header, events = read_trace(data_file(trace))
    client.open_session(job, header.modalities, profile)
    out = []
    for ev in events:
        if isinstance(ev, TraceEpochEnd):
            client.end_epoch(job, attempt=0, epoch=ev.epoch)
            continue
        resp = client.report(job, attempt=0, epoch=ev.epoch, step=ev.step, count=ev.count,
                             score_sums=ev.score_sum, fisher=ev.fisher)
        out.append({s.modality: s.factors.proximal for s in resp.step.modalities})
    return out


def feed_deferred(
    client_of: Callable[[], RegulatorClient], trace: str, profile: str, job: str,
    between: Optional[Callable[[int], RegulatorClient]] = None,
) -> tuple[RegulatorClient, list[dict]]:
    """What the current hook does: scores first, each step's Fisher value with the next request.
    ``between(i)`` may replace the client (a restart) before event i."""
    header, events = read_trace(data_file(trace))
    client = client_of()
    client.open_session(job, header.modalities, profile)
    pending: Optional[TraceStep] = None
    out = []
    for i, ev in enumerate(events):
        if between is not None:
            client = between(i) or client
        measured = (pending.step, pending.fisher) if pending is not None else None
        if isinstance(ev, TraceEpochEnd):
            client.end_epoch(job, attempt=0, epoch=ev.epoch, measured=measured)
            pending = None
            continue
        resp = client.report(job, attempt=0, epoch=ev.epoch, step=ev.step, count=ev.count,
                             score_sums=ev.score_sum, fisher={m: None for m in header.modalities},
                             measured=[measured] if measured else [])
        assert all(math.isnan(s.fisher) for s in resp.step.modalities)  # not measured yet
        out.append({s.modality: s.factors.proximal for s in resp.step.modalities})
        pending = ev
    return client, out


@pytest.mark.parametrize(
    "trace,profile",
    [("trace_pix+mor_seed0.jsonl", "official"), ("trace_pix+mor_seed0.jsonl", "paper"),
     ("synthetic_3mod_seed11.jsonl", "paper")],
)
def test_deferred_values_give_the_same_history_bit_for_bit(trace: str, profile: str) -> None:
    immediate = RegulatorClient.in_process()
    factors_now = feed_immediate(immediate, trace, profile, JOB)
    deferred, factors_later = feed_deferred(RegulatorClient.in_process, trace, profile, JOB)
    assert factors_later == factors_now
    assert history(deferred) == history(immediate)  # every step's fisher, every epoch's trace


def test_a_pending_step_survives_restarts_of_the_store(stores: Stores) -> None:
    """Restart (new store, new manager on the same file or database) at many points, including
    right after a step whose value is still pending: the history ends up identical."""
    trace = "trace_pix+mor_seed0.jsonl"
    opened: list[Any] = []

    def fresh() -> RegulatorClient:
        if opened and stores.backend != "memory":
            opened[-1].close()
        opened.append(stores.open())
        return RegulatorClient.in_process(api_for(opened[-1]))

    restarts = {1, 2, 26, 27, 300, 301, 777}  # after the first step, around an epoch end, ...
    client, _ = feed_deferred(fresh, trace, "official", JOB, between=lambda i: fresh() if i in restarts else None)
    reference = RegulatorClient.in_process()
    feed_immediate(reference, trace, "official", JOB)
    assert history(client) == history(reference)
    opened[-1].close()


def _session(client: RegulatorClient) -> None:
    """Epoch 0 closed with steps 0-1; step 2 of epoch 1 answered, its Fisher value pending."""
    client.open_session(JOB, ["audio", "visual"], "official")
    client.report(JOB, attempt=0, epoch=0, step=0, count=8, score_sums={"audio": 5.0, "visual": 3.0},
                  fisher={"audio": None, "visual": None})
    client.report(JOB, attempt=0, epoch=0, step=1, count=8, score_sums={"audio": 4.0, "visual": 6.0},
                  fisher={"audio": None, "visual": None}, measured=[(0, {"audio": 1e-3, "visual": 2e-3})])
    client.end_epoch(JOB, attempt=0, epoch=0, measured=(1, {"audio": 3e-3, "visual": 4e-3}))
    client.report(JOB, attempt=0, epoch=1, step=2, count=8, score_sums={"audio": 5.0, "visual": 3.0},
                  fisher={"audio": None, "visual": None})


def _report(client: RegulatorClient, step: int = 3, **kw: Any) -> pb.ReportResponse:
    base: dict[str, Any] = dict(attempt=0, epoch=1, step=step, count=8, score_sums={"audio": 5.0, "visual": 3.0},
                                fisher={"audio": None, "visual": None}, measured=[(2, {"audio": 5e-3, "visual": 6e-3})])
    base.update(kw)
    return client.report(JOB, **base)


def _raw(client: RegulatorClient, **kw: Any) -> Any:
    req = pb.ReportRequest(job_id=JOB, epoch=1, step=3, count=8, stats=[
        pb.ModalityStats(modality="audio", score_sum=5.0, fisher_deferred=True),
        pb.ModalityStats(modality="visual", score_sum=3.0, fisher_deferred=True)])
    for k, v in kw.items():
        setattr(req, k, v) if not isinstance(v, list) else getattr(req, k).extend(v)
    return client.transport.report(req)


BAD: list[tuple[str, Callable[[RegulatorClient], Any], type]] = [
    ("new step while a value is pending", lambda c: _report(c, measured=[]), FailedPrecondition),
    ("epoch end while a value is pending", lambda c: c.end_epoch(JOB, attempt=0, epoch=1), FailedPrecondition),
    ("epoch end with another step's values", lambda c: c.end_epoch(JOB, attempt=0, epoch=1, measured=(1, {"audio": 3e-3, "visual": 4e-3})), FailedPrecondition),
    ("recorded value sent again, different", lambda c: _report(c, measured=[(1, {"audio": 9e-3, "visual": 4e-3}), (2, {"audio": 5e-3, "visual": 6e-3})]), AlreadyExists),
    ("values of a step never recorded", lambda c: _report(c, step=5, measured=[(4, {"audio": 1.0, "visual": 1.0})]), FailedPrecondition),
    ("values of a later step", lambda c: _report(c, measured=[(4, {"audio": 1.0, "visual": 1.0})]), InvalidArgument),
    ("own step's values on a regulated report", lambda c: _report(c, measured=[(2, {"audio": 5e-3, "visual": 6e-3}), (3, {"audio": 1.0, "visual": 1.0})]), InvalidArgument),
    ("steps out of order", lambda c: _report(c, measured=[(2, {"audio": 5e-3, "visual": 6e-3}), (1, {"audio": 3e-3, "visual": 4e-3})]), InvalidArgument),
    ("a NaN value", lambda c: _report(c, measured=[(2, {"audio": math.nan, "visual": 6e-3})]), InvalidArgument),
    ("a negative value", lambda c: _report(c, measured=[(2, {"audio": -1.0, "visual": 6e-3})]), InvalidArgument),
    ("an infinite value", lambda c: _report(c, measured=[(2, {"audio": math.inf, "visual": 6e-3})]), InvalidArgument),
    ("a missing modality", lambda c: _report(c, measured=[(2, {"audio": 5e-3})]), InvalidArgument),
    ("an unknown modality", lambda c: _report(c, measured=[(2, {"audio": 5e-3, "visual": 6e-3, "x": 1.0})]), InvalidArgument),
    ("some modalities deferred, some not", lambda c: _report(c, fisher={"audio": None, "visual": 1e-3}), InvalidArgument),
    ("fisher_deferred set to false", lambda c: _raw(c, stats=[pb.ModalityStats(modality="audio", score_sum=5.0, fisher_deferred=False),
                                                              pb.ModalityStats(modality="visual", score_sum=3.0, fisher_deferred=True)]), InvalidArgument),
]


@pytest.mark.parametrize("name,call,error", BAD, ids=[b[0] for b in BAD])
def test_inconsistent_deferred_values_are_refused_and_change_nothing(name: str, call: Callable[[RegulatorClient], Any], error: type) -> None:
    client = RegulatorClient.in_process()
    _session(client)
    before = history(client)
    with pytest.raises(error):
        call(client)
    assert history(client) == before
    # and the job continues normally afterwards
    resp = _report(client)
    assert not resp.duplicate
    assert client.end_epoch(JOB, attempt=0, epoch=1, measured=(3, {"audio": 7e-3, "visual": 8e-3})).closed.modalities[0].fisher_trace == 5e-3 + 7e-3


def test_values_that_overflow_the_epoch_trace_are_refused() -> None:
    client = RegulatorClient.in_process()
    _session(client)
    _report(client, measured=[(2, {"audio": 1.7e308, "visual": 1.0})])
    before = history(client)
    with pytest.raises(InvalidArgument, match="overflow"):
        client.end_epoch(JOB, attempt=0, epoch=1, measured=(3, {"audio": 1.7e308, "visual": 1.0}))
    with pytest.raises(InvalidArgument, match="overflow"):
        _report(client, step=4, measured=[(3, {"audio": 1.7e308, "visual": 1.0})])
    assert history(client) == before


def test_retries_are_idempotent_and_values_are_recorded_once() -> None:
    client = RegulatorClient.in_process()
    _session(client)
    first = _report(client)
    again = _report(client)  # the same request retried (its first answer was lost)
    assert again.duplicate and again.step == first.step
    end = client.end_epoch(JOB, attempt=0, epoch=1, measured=(3, {"audio": 7e-3, "visual": 8e-3}))
    retried = client.end_epoch(JOB, attempt=0, epoch=1, measured=(3, {"audio": 7e-3, "visual": 8e-3}))
    assert retried.duplicate and retried.closed == end.closed
    with pytest.raises(AlreadyExists):
        client.end_epoch(JOB, attempt=0, epoch=1, measured=(3, {"audio": 7e-3, "visual": 1.0}))
    steps = client.get_session(JOB, include_steps=True).steps
    assert [[m.fisher for m in s.modalities] for s in steps] == [[1e-3, 2e-3], [3e-3, 4e-3], [5e-3, 6e-3], [7e-3, 8e-3]]
    assert [e.modalities[0].fisher_trace for e in client.get_session(JOB).epochs] == [1e-3 + 3e-3, 5e-3 + 7e-3, 0.0]


def test_a_late_fallback_report_amends_a_pending_step_with_its_measured_values() -> None:
    """The regulator answered step 2 but the client never got the answer: it applied zero
    coefficients, measured the Fisher value of what it applied, and reports that late."""
    client = RegulatorClient.in_process()
    _session(client)
    regulated = client.get_session(JOB, include_steps=True).steps[2]
    assert regulated.modalities[0].factors.proximal > 0  # the official window is open at epoch 1
    late = _report(client, step=2, fallback=pb.FALLBACK_NEUTRAL, measured=[(2, {"audio": 5e-3, "visual": 6e-3})])
    assert not late.duplicate and late.step.fallback == pb.FALLBACK_NEUTRAL
    assert [m.factors.proximal for m in late.step.modalities] == [0.0, 0.0]
    assert [m.fisher for m in late.step.modalities] == [5e-3, 6e-3]
    _report(client, measured=[])  # step 2 is no longer pending
    detail = client.get_session(JOB, include_steps=True)
    assert detail.epochs[1].fallback_steps == 1
    assert detail.epochs[1].modalities[0].regulated_steps == 1  # step 3 only: step 2 ran unregulated


def test_older_clients_terms_and_values_still_work_beside_deferred_ones() -> None:
    """A session fed fisher_terms (every rank of an old DDP job) is unaffected."""
    client = RegulatorClient.in_process()
    client.open_session(JOB, ["audio", "visual"], "official", world_size=2)
    for rank in (0, 1):
        resp = client.report(JOB, attempt=0, epoch=0, step=0, count=8, score_sums={"audio": 5.0, "visual": 3.0},
                             fisher={"audio": (1e-3, 1e-4, 1e-5), "visual": 2e-3}, rank=rank)
        assert resp.duplicate == (rank == 1)
    a = resp.step.modalities[0].factors.proximal
    assert resp.step.modalities[0].fisher == 1e-3 + 2 * a * 1e-4 + a * a * 1e-5
