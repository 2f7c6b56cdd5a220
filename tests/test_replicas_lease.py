"""Leases and fencing tokens on a real PostgreSQL (``storage/lease.py``, ``core/ownership.py``):
who may serve a job is decided by the database and its clock, and a write carrying a stale token
changes nothing."""

from __future__ import annotations

import time

import psycopg
import pytest

from regulator_service.core.ownership import NotOwner, Ownership
from regulator_service.storage.lease import LEASES_DDL, Held, LeaseTable

TTL_S = 0.8  # long enough for the next statement or two on a loaded machine
WAIT_S = 30.0  # bound for waits on a loaded machine (never an assertion on time)


@pytest.fixture
def leases_db(pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(LEASES_DDL)
    return pg_dsn


def _take_when_lapsed(table: LeaseTable, job: str, mine=None) -> int:
    """Polls until the other replica's lease has lapsed by the database's clock."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = table.take(job, mine)
        if not isinstance(got, Held):
            return got
        assert 0 <= got.remaining_s <= table.ttl_s + 0.05
        time.sleep(0.05)
    raise AssertionError(f"the lease of {job} never lapsed")


def claim(own: Ownership, job: str) -> bool:
    """Claims ``job``; whether memory of it had to be dropped (a new token)."""
    dropped: list[str] = []
    own.claim(job, lambda: dropped.append(job))
    return bool(dropped)


def _fence_rows(dsn: str, guard: tuple[str, tuple]) -> int:
    """The rows the fencing statement matches (the store refuses a write unless it is one)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(*guard).rowcount


def test_one_owner_at_a_time_and_tokens_only_grow(leases_db: str) -> None:
    a = LeaseTable(leases_db, "replica-a", TTL_S, timeout_s=5)
    b = LeaseTable(leases_db, "replica-b", TTL_S, timeout_s=5)
    try:
        assert a.take("job", None) == 1
        assert isinstance(b.take("job", None), Held)
        assert a.take("job", 1) == 1  # still ours: the token stays, memory stays valid
        assert _fence_rows(leases_db, a.fence("job", 1)) == 1  # a write under the lease passes
        token_b = _take_when_lapsed(b, "job")
        assert token_b == 2
        # a's token is stale now: the database refuses its writes, whatever a believes
        assert _fence_rows(leases_db, a.fence("job", 1)) == 0
        assert _fence_rows(leases_db, b.fence("job", 2)) == 1
        assert b.take("job", 2) == 2 and isinstance(a.take("job", 1), Held)  # b's again, for a TTL
        b.release_all()
        assert a.take("job", 1) == 3  # a comes back with a new token, never an old one
        assert _fence_rows(leases_db, b.fence("job", 2)) == 0
    finally:
        a.close()
        b.close()


def test_renew_keeps_only_unexpired_leases_of_this_replica(leases_db: str) -> None:
    a = LeaseTable(leases_db, "replica-a", TTL_S, timeout_s=5)
    b = LeaseTable(leases_db, "replica-b", TTL_S, timeout_s=5)
    try:
        assert a.take("j1", None) == 1 and a.take("j2", None) == 1
        assert a.renew(["j1", "j2", "unknown"]) == {"j1": 1, "j2": 1}
        deadline = time.monotonic() + WAIT_S
        while isinstance(b.take("j2", None), Held):  # a keeps j1 only, so j2 lapses
            assert a.take("j1", 1) == 1 and time.monotonic() < deadline
            time.sleep(0.05)
        assert a.take("j1", 1) == 1
        assert a.renew(["j1", "j2"]) == {"j1": 1}  # j2 is b's now (j1 was taken back just now: unexpired)
    finally:
        a.close()
        b.close()


def test_ownership_refuses_a_held_job_with_a_retry_after_and_drops_on_takeover(leases_db: str) -> None:
    now = [0.0]
    a = Ownership(LeaseTable(leases_db, "replica-a", TTL_S, timeout_s=5), clock=lambda: now[0])
    b = Ownership(LeaseTable(leases_db, "replica-b", TTL_S, timeout_s=5))
    try:
        assert claim(a, "job") is True  # a new token: nothing in memory may predate it
        assert a.holds("job")
        with pytest.raises(NotOwner) as refused:
            claim(b, "job")
        assert refused.value.code.name == "UNAVAILABLE"
        assert 0 < refused.value.retry_after_ms <= TTL_S * 1000
        assert "replica-a" not in refused.value.message  # names nothing of the other replica
        # a's clock stands still (a paused process): it still trusts its lease...
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                assert claim(b, "job") is True
                break
            except NotOwner:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert a.holds("job")
        # ...but the database refuses its writes: its token is stale
        assert _fence_rows(leases_db, a.fence("job")) == 0
        assert _fence_rows(leases_db, b.fence("job")) == 1
        now[0] += TTL_S  # a's clock moves on: it asks the database, which says no
        assert not a.holds("job")
        b.renew_once()  # (b serves the job: its lease runs)
        with pytest.raises(NotOwner):
            claim(a, "job")
    finally:
        a.close()
        b.close()


def test_renewals_keep_served_jobs_and_forget_long_idle_ones(leases_db: str) -> None:
    now = [0.0]
    a = Ownership(LeaseTable(leases_db, "replica-a", TTL_S, timeout_s=5), clock=lambda: now[0])
    try:
        assert claim(a, "busy") and claim(a, "idle")
        now[0] += 0.5 * TTL_S
        a.renew_once()
        assert a.holds("busy") and a.holds("idle")  # renewed: trusted for another 0.8 TTL from here
        now[0] += 0.7 * TTL_S
        assert a.holds("busy") and a.holds("idle")
        now[0] += 100 * TTL_S + 100.0  # "busy" is served again, "idle" never
        assert not a.holds("busy")
        assert claim(a, "busy") is False  # asked again: still ours, with the same token
        a.renew_once()
        assert a.holds("busy")
        assert claim(a, "idle") is True  # forgotten (bounded memory): a new token, its sessions re-read
    finally:
        a.close()


def test_renewal_never_deadlocks_with_a_write_in_flight(leases_db: str) -> None:
    """A renewal of several leases and a group commit (which holds ``FOR SHARE`` on the lease row
    of every job it writes, in the order its writes came) must not wait on each other in a cycle:
    the renewal used to lock its rows one by one in its own order, so that a commit holding job B's
    row and then asking for job A's, while the renewal held A's and waited for B's, was a deadlock
    that PostgreSQL broke by failing one of them (seen under a 16-job bench as UNAVAILABLE)."""
    table = LeaseTable(leases_db, "replica-a", 30.0, timeout_s=30)
    try:
        assert table.take("job-a", None) == 1 and table.take("job-b", None) == 1
        with psycopg.connect(leases_db) as writer:  # a commit's transaction: job-b written first
            assert writer.execute(*table.fence("job-b", 1)).rowcount == 1
            renewed: dict = {}
            errors: list[BaseException] = []

            def renew() -> None:
                try:
                    renewed.update(table.renew(["job-a", "job-b"]))
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            import threading

            thread = threading.Thread(target=renew)
            thread.start()
            with psycopg.connect(leases_db, autocommit=True) as watch:  # until the renewal waits for job-b's row
                deadline = time.monotonic() + WAIT_S
                while not watch.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%leases%' "
                    "AND datname = current_database()"
                ).fetchall():
                    assert thread.is_alive() or errors or renewed, "the renewal ended without waiting"
                    if not thread.is_alive():
                        break
                    assert time.monotonic() < deadline, "the renewal never reached job-b's row"
                    time.sleep(0.02)
            # the commit goes on with its second job; under the old renewal this is the deadlock
            assert writer.execute(*table.fence("job-a", 1)).rowcount == 1
            writer.commit()
            thread.join(WAIT_S)
        assert not thread.is_alive()
        assert not errors, errors
        assert renewed == {"job-a": 1, "job-b": 1}
    finally:
        table.close()
