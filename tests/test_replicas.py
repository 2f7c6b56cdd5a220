"""Several replicas on one PostgreSQL, in one process: a job is served by one replica at a time
(its lease), another continues it exactly once the lease lapses, and a replica whose lease was
taken over cannot write, whatever its own clock says (the database refuses its token)."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import pytest

from regulator_client import RegulatorClient
from regulator_client.trace import TraceEpochEnd, read_trace
from regulator_service.core.manager import SessionManager
from regulator_service.core.ownership import Ownership
from regulator_service.errors import Unavailable
from regulator_service.storage.lease import LeaseTable
from regulator_service.storage.postgresql import PostgreSQLStore
from regulator_service.wire.api import RegulatorAPI

from .conftest import data_file

TTL_S = 1.0  # renewed every third: a loaded machine's stalls stay well below it
WAIT_S = 60.0  # bound on waiting for a lease to lapse on a loaded machine (never asserted as a time)
TRACE = "trace_pix+mor_seed0.jsonl"


class Replica:
    """One regulator's core over the shared database (no gRPC: the in-process transport)."""

    def __init__(self, dsn: str, name: str, clock: Callable[[], float], renew: bool) -> None:
        self.ownership = Ownership(LeaseTable(dsn, name, TTL_S, timeout_s=10), clock=clock)
        if renew:
            self.ownership.start()
        self.store = PostgreSQLStore(dsn, timeout_s=10, guard=lambda key: self.ownership.fence(key.job_id))
        self.client = RegulatorClient.in_process(RegulatorAPI(SessionManager(self.store, ownership=self.ownership)))

    def close(self) -> None:
        self.ownership.close()
        self.store.close()


@pytest.fixture
def replicas(pg_dsn: str) -> Iterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(name: str, clock: Callable[[], float] = time.monotonic, renew: bool = True) -> Replica:
        """``renew`` False: a replica that stops after its last call (its lease lapses)."""
        made.append(Replica(pg_dsn, name, clock, renew))  # the store's schema holds the leases
        return made[-1]

    yield make
    for r in made:
        r.close()


def events() -> list:
    return read_trace(data_file(TRACE))[1]


def send(client: RegulatorClient, ev) -> object:  # type: ignore[no-untyped-def]
    if isinstance(ev, TraceEpochEnd):
        return client.end_epoch("job", attempt=0, epoch=ev.epoch)
    return client.report("job", attempt=0, epoch=ev.epoch, step=ev.step, count=ev.count,
                         score_sums=ev.score_sum, fisher=ev.fisher)


def send_when_served(client: RegulatorClient, ev) -> object:  # type: ignore[no-untyped-def]
    """Retries while another replica's lease runs, as the client library does (UNAVAILABLE)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return send(client, ev)
        except Unavailable:
            assert time.monotonic() < deadline, "the other replica's lease never lapsed"
            time.sleep(0.05)


def reference(upto: int) -> tuple[list, RegulatorClient]:
    ref = RegulatorClient.in_process()
    ref.open_session("job", ["pix", "mor"], "official")
    return [send(ref, ev) for ev in events()[:upto]], ref


def history(client: RegulatorClient) -> tuple:
    """The job's epochs and every step record (not the session's times, which differ by run)."""
    resp = client.get_session("job", 0, include_steps=True)
    return (resp.session.steps, [e.SerializeToString(deterministic=True) for e in resp.epochs],
            [s.SerializeToString(deterministic=True) for s in resp.steps])


def test_a_replica_takes_a_lapsed_job_over_and_continues_it_exactly(replicas) -> None:  # type: ignore[no-untyped-def]
    evs = events()[:400]
    want, ref = reference(len(evs))
    a, b = replicas("replica-a", renew=False), replicas("replica-b")
    a.client.open_session("job", ["pix", "mor"], "official")
    got = [send(a.client, ev) for ev in evs[:250]]
    with pytest.raises(Unavailable):  # a holds the job: b refuses to serve it
        send(b.client, evs[250])
    # a stops (never renews again): b serves the job once a's lease lapses by the database's clock
    got.append(send_when_served(b.client, evs[250]))
    got += [send(b.client, ev) for ev in evs[251:]]
    assert got == want  # every answer as a fault-free run gave it
    assert history(b.client) == history(ref)  # every step once


def test_a_replica_whose_lease_was_taken_over_cannot_write(replicas) -> None:  # type: ignore[no-untyped-def]
    """A's clock stands still (a paused process that still trusts its lease): it plans the next
    step from its stale memory, and the database refuses the write; b's rows stay."""
    evs = events()[:131]
    frozen = [0.0]
    a, b = replicas("replica-a", clock=lambda: frozen[0], renew=False), replicas("replica-b")
    a.client.open_session("job", ["pix", "mor"], "official")
    for ev in evs[:100]:
        send(a.client, ev)
    assert a.ownership.holds("job")
    send_when_served(b.client, evs[100])
    for ev in evs[101:130]:
        send(b.client, ev)
    assert a.ownership.holds("job")  # by its own clock, a still serves the job...
    with pytest.raises(Unavailable, match="another regulator replica"):
        send(a.client, evs[100])  # ...but the database refuses the write of its stale token
    _, ref = reference(130)
    assert history(b.client) == history(ref)  # b's rows only
    frozen[0] += 10 * TTL_S  # a's memory of the job is gone: it asks the database, which says b
    with pytest.raises(Unavailable, match="served by another regulator replica"):
        send(a.client, evs[130])
