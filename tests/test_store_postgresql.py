"""What the PostgreSQL store does beyond the store tests every backend runs (the ``stores``
fixture): group commit, fencing guards, its schema, corrupt rows, bad DSNs, a server that goes
away and comes back. A real PostgreSQL (tests/postgres.py), a fresh database per test."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any, Optional

import psycopg
import pytest
from grpc_health.v1 import health_pb2

from regulator_client import RegulatorClient
from regulator_client.errors import Unavailable
from regulator_service.core.manager import SessionManager
from regulator_service.edge.server import RegulatorServer, ServerConfig
from regulator_service.model import EpochSummary, Fallback, SessionConfig, SessionKey, StepRecord
from regulator_service.policy import BUILTIN_PROFILES, Window
from regulator_service.storage import pg_appends
from regulator_service.storage.base import Quarantined, SessionFenced, StoreError, StoredSession
from regulator_service.storage.lease import FENCE, LeaseTable
from regulator_service.storage.pg_ops import PgOp
from regulator_service.storage.pg_schema import SCHEMA_VERSION, check_dsn
from regulator_service.storage.postgresql import PostgreSQLStore
from regulator_service.storage.statements import POSTGRESQL
from regulator_service.wire.api import RegulatorAPI

from .conftest import health, roomy_limits, wait_until
from .postgres import PgCluster, Stores

OPEN = (Window(open=True, growth=0.0), Window(open=True, growth=0.0))
STATS: dict[str, Any] = dict(count=8, score_sums={"a": 4.0, "b": 2.0}, fisher={"a": 0.1, "b": 0.2})


def _config(job: str) -> SessionConfig:
    return SessionConfig(job, 0, 1, ("a", "b"), BUILTIN_PROFILES.get("official").restore({}))


def _record(step: int) -> StepRecord:
    return StepRecord(epoch=0, step=step, count=8, score_sums=(1.0, 2.0), fishers=(0.1, 0.2), proximal=(0.5, 0.5),
                      fallback=Fallback.NONE, digest=bytes(16))


def _held(store: PostgreSQLStore) -> tuple[threading.Event, threading.Thread]:
    """The writer inside a commit that waits for the returned gate: ops submitted meanwhile
    queue for the next transaction."""
    gate = threading.Event()
    first = threading.Thread(target=lambda: store._writer.submit(PgOp(fn=lambda c: gate.wait())))
    first.start()
    wait_until(lambda: store._writer._busy_since is not None, "the first commit is running")
    return gate, first


def _queued(store: PostgreSQLStore, submit: Any, n: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=submit, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    wait_until(lambda: len(store._writer._queue) == n, f"{n} ops queued behind the running commit")
    return threads


def test_concurrent_writes_share_one_transaction_and_a_bad_one_fails_alone(pg_dsn: str) -> None:
    store = PostgreSQLStore(pg_dsn, timeout_s=30)
    for k in range(16):
        store.create_session(_config(f"job{k}"), 1, OPEN)
    results: dict[int, Optional[BaseException]] = {}

    def append(k: int) -> None:  # job0 and job15 get step 0; job0 gets it twice
        try:
            store.append_step(SessionKey(f"job{k % 15}", 0), _record(0), 2)
            results[k] = None
        except StoreError as exc:
            results[k] = exc

    gate, first = _held(store)
    threads = _queued(store, append, 16)
    before = store._writer.commits
    gate.set()
    for th in threads + [first]:
        th.join()
    failed = [k for k, e in results.items() if e is not None]
    assert len(failed) == 1 and failed[0] in (0, 15)
    assert "duplicate key" in str(results[failed[0]])
    assert store._writer.commits - before == 1 + 15  # the held one, then the batch re-run op by op
    assert sorted(s.config.job_id for s in store.load() if isinstance(s, StoredSession) and s.step_count == 1) == sorted(
        f"job{k}" for k in range(15))

    gate, first = _held(store)  # without a bad op: the 15 queued appends are one transaction
    threads = _queued(store, lambda k: store.append_step(SessionKey(f"job{k}", 0), _record(1), 3), 15)
    before = store._writer.commits
    gate.set()
    for th in threads + [first]:
        th.join()
    assert store._writer.commits - before == 2
    store.close()


def test_a_guard_that_matches_no_row_fences_the_write_and_only_it(pg_dsn: str) -> None:
    """The guard runs in the write's transaction: a lease token bumped by another replica makes
    the database refuse this one's writes of that job; other jobs' writes in the batch commit."""
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE fence (job TEXT PRIMARY KEY, token INT)")
        admin.execute("INSERT INTO fence VALUES ('a', 1), ('b', 1)")
        store = PostgreSQLStore(
            pg_dsn, timeout_s=30, guard=lambda key: ("UPDATE fence SET token=token WHERE job=%s AND token=1", (key.job_id,))
        )
        for job in ("a", "b"):
            store.create_session(_config(job), 1, OPEN)
            store.append_step(SessionKey(job, 0), _record(0), 2)
        admin.execute("UPDATE fence SET token=2 WHERE job='a'")  # another replica took job a over
        with pytest.raises(SessionFenced, match="no longer holds"):
            store.append_step(SessionKey("a", 0), _record(1), 3)
        results: dict[int, Optional[BaseException]] = {}

        def append(k: int) -> None:
            try:
                store.append_step(SessionKey("ab"[k % 2], 0), _record(2 + k // 2), 4)
                results[k] = None
            except StoreError as exc:
                results[k] = exc

        gate, first = _held(store)
        threads = _queued(store, append, 6)
        gate.set()
        for th in threads + [first]:
            th.join()
        assert all(isinstance(results[k], SessionFenced) for k in (0, 2, 4))
        assert all(results[k] is None for k in (1, 3, 5))
        steps = dict(admin.execute("SELECT job_id, COUNT(*) FROM steps GROUP BY job_id").fetchall())
        assert steps == {"a": 1, "b": 4}
    store.close()


def test_reports_of_a_batch_are_one_statement_fenced_by_their_leases(pg_dsn: str) -> None:
    """A batch of appends under real leases (``lease.FENCE``) commits as one statement
    (``pg_appends``): a job whose lease was taken over is refused alone, the others are
    written; an epoch's close in the same batch commits in its own transaction; a step stored
    twice sends the appends op by op, and only that one fails."""
    PostgreSQLStore(pg_dsn).close()  # the schema, the leases table with it
    leases = LeaseTable(pg_dsn, "replica-a", 60.0, timeout_s=10)
    tokens = {job: leases.take(job, None) for job in ("a", "b", "c")}
    store = PostgreSQLStore(pg_dsn, timeout_s=30, guard=lambda key: leases.fence(key.job_id, tokens[key.job_id]))
    for job in ("a", "b", "c"):
        store.create_session(_config(job), 1, OPEN)
    store.append_step(SessionKey("a", 0), _record(0), 2)  # a lone append: one statement too
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("UPDATE leases SET owner='replica-b', token=token+1 WHERE job_id='a'")  # taken over
        results: dict[int, Optional[BaseException]] = {}

        def append(k: int) -> None:
            try:
                store.append_step(SessionKey("ab"[k % 2], 0), _record(1 + k // 2), 4)
                results[k] = None
            except StoreError as exc:
                results[k] = exc

        def close_epoch() -> None:
            store.close_epoch(SessionKey("c", 0), EpochSummary(0, OPEN), 1, OPEN, 5)
            results[-1] = None

        gate, first = _held(store)
        threads = _queued(store, append, 6)
        threads += [threading.Thread(target=close_epoch)]
        threads[-1].start()
        wait_until(lambda: len(store._writer._queue) == 7, "the epoch's close queued with the appends")
        before = store._writer.commits
        gate.set()
        for th in threads + [first]:
            th.join()
        assert all(isinstance(results[k], SessionFenced) for k in (0, 2, 4)), results
        assert all(results[k] is None for k in (1, 3, 5, -1)), results
        assert store._writer.commits - before == 1 + 2  # the held one; the appends; the close
        steps = dict(admin.execute("SELECT job_id, COUNT(*) FROM steps GROUP BY job_id").fetchall())
        assert steps == {"a": 1, "b": 3}
        assert admin.execute("SELECT COUNT(*) FROM epochs WHERE job_id='c'").fetchone() == (1,)

        gate, first = _held(store)  # b's step 1 again (a duplicate) among new steps of b and c
        results.clear()

        def again(k: int) -> None:
            try:
                store.append_step(SessionKey("bc"[k], 0), _record((1, 8)[k]), 6)
                results[k] = None
            except StoreError as exc:
                results[k] = exc

        threads = _queued(store, again, 2)
        before = store._writer.commits
        gate.set()
        for th in threads + [first]:
            th.join()
        assert "duplicate key" in str(results[0]) and results[1] is None
        assert store._writer.commits - before == 1 + 1  # the held one; c's step alone (b's failed)
        steps = dict(admin.execute("SELECT job_id, COUNT(*) FROM steps GROUP BY job_id").fetchall())
        assert steps == {"a": 1, "b": 3, "c": 1}
    store.close()
    leases.close()


def test_a_commit_waits_for_the_followers_of_the_last_batch_within_its_bound(pg_dsn: str) -> None:
    """``CommitQueue._gather``: after a batch of three, a lone write waits for two more to share
    its commit; never longer than the last commit took; after a batch of one, never."""
    store = PostgreSQLStore(pg_dsn, timeout_s=30)
    for k in range(3):
        store.create_session(_config(f"job{k}"), 1, OPEN)
    writer = store._writer
    writer._hold_s = 60.0  # the bound under test is the last commit's time, set below

    def append(k: int, step: int) -> threading.Thread:
        th = threading.Thread(target=store.append_step, args=(SessionKey(f"job{k}", 0), _record(step), 2))
        th.start()
        return th

    writer._last = (3, 60.0)  # as after a batch of three that took a minute: wait for three
    before = writer.commits
    first = append(0, 0)
    wait_until(lambda: writer._want == 3, "the committer waits for the followers")
    assert writer.commits == before and first.is_alive()
    rest = [append(1, 0), append(2, 0)]
    for th in [first, *rest]:
        th.join()
    assert writer.commits - before == 1  # the three in one commit
    assert writer._last[0] == 3

    writer._last = (3, 0.05)  # the last commit took 50 ms: a lone write waits no longer than that
    before = writer.commits
    lone = append(0, 1)
    lone.join(30)  # (a wait of the 60 s bound would still be running)
    assert not lone.is_alive() and writer.commits - before == 1 and writer._last[0] == 1

    writer._last = (1, 60.0)  # after a batch of one: no wait at all
    before = writer.commits
    lone = append(0, 2)
    lone.join(30)
    assert not lone.is_alive() and writer.commits - before == 1 and writer._want == 0
    store.close()


def test_only_appends_of_one_shape_go_in_one_statement() -> None:
    """``pg_appends.split``: plain appends (or fenced ones) of every job together; an append that
    also fills an older step, an epoch's close, a function: the transaction's."""
    key = SessionKey("j", 0)
    plain = PgOp(POSTGRESQL.append_step(key, _record(1), 2, None)[0])
    filled = PgOp(POSTGRESQL.append_step(key, _record(2), 2, _record(1))[0])
    fenced = PgOp(((FENCE, ("j", "me", 3), 1), *POSTGRESQL.append_step(key, _record(3), 2, None)[0]), fenced=True)
    closing = PgOp(POSTGRESQL.close_epoch(key, EpochSummary(0, OPEN), 1, OPEN, 2, None))
    function = PgOp(fn=lambda conn: None)
    assert pg_appends.split([filled, plain, closing, function, plain]) == ([plain, plain], [filled, closing, function])
    assert pg_appends.split([fenced, closing, fenced]) == ([fenced, fenced], [closing])
    assert pg_appends.split([closing, filled]) == ([], [closing, filled])
    sql, params = pg_appends.statement([fenced, fenced])
    assert sql.startswith("WITH fenced AS (SELECT job_id FROM leases") and "RETURNING job_id, attempt, step" in sql
    assert params[:3] == (["j", "j"], ["me", "me"], [3, 3]) and params[5] == [3, 3]  # the fences, then the rows
    assert pg_appends.row(fenced) == ("j", 0, 3)


def test_the_schema_is_versioned_and_a_newer_one_is_refused_untouched(pg_dsn: str) -> None:
    PostgreSQLStore(pg_dsn).close()
    PostgreSQLStore(pg_dsn).close()  # migrated once: opening again changes nothing
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        assert admin.execute("SELECT version FROM regulator_schema").fetchall() == [(SCHEMA_VERSION,)]
        admin.execute("INSERT INTO regulator_schema (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
        admin.execute("CREATE TABLE newer (x INT)")
        tables = admin.execute("SELECT tablename FROM pg_tables WHERE schemaname='public' ORDER BY 1").fetchall()
        with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}.*refusing to touch it"):
            PostgreSQLStore(pg_dsn)
        assert admin.execute("SELECT tablename FROM pg_tables WHERE schemaname='public' ORDER BY 1").fetchall() == tables


def test_a_corrupt_row_quarantines_its_session_only(pg_dsn: str) -> None:
    store = PostgreSQLStore(pg_dsn)
    for job in ("good", "bad"):
        store.create_session(_config(job), 1, OPEN)
        store.append_step(SessionKey(job, 0), _record(0), 2)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("UPDATE steps SET record='{not json' WHERE job_id='bad'")
    loaded = {s.key.job_id if isinstance(s, Quarantined) else s.config.job_id: s for s in store.load()}
    assert isinstance(loaded["bad"], Quarantined) and "step 0" in loaded["bad"].reason
    assert isinstance(loaded["good"], StoredSession) and loaded["good"].step_count == 1
    with psycopg.connect(pg_dsn, autocommit=True) as admin:  # left as it was
        assert admin.execute("SELECT record FROM steps WHERE job_id='bad'").fetchone() == ("{not json",)
    store.close()


def test_regulator_serve_on_postgresql_says_so_and_bad_stores_are_one_line(pg_cluster: PgCluster, pg_dsn: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "regulator_cli", "serve", "--port", "0", "--metrics-port", "-1", "--store", pg_dsn],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the server prints it once serving (or exits: EOF)
        assert f"state PostgreSQL postgres@{pg_cluster.root}:{pg_cluster.port}/" in line, (line, proc.stderr and proc.stderr.read())
    finally:
        proc.terminate()
        assert proc.wait(60) == 0

    for dsn, message in [
        ("mysql://u@h/db", "scheme 'mysql'"),
        ("postgresql://u@h:notaport/db", "'notaport' is not a port number"),
        ("postgresql://u@h/db?nosuch=1", "not a valid PostgreSQL URL: invalid URI query parameter"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_dsn(dsn)
    unreachable = f"postgresql://postgres@/nowhere?host={pg_cluster.root}&port=1"
    with pytest.raises(StoreError, match=r"^cannot connect to PostgreSQL postgres@.*:1/nowhere: "):
        PostgreSQLStore(unreachable)
    out = subprocess.run(
        [sys.executable, "-m", "regulator_cli", "serve", "--port", "0", "--metrics-port", "-1", "--store", unreachable],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("regulator serve: cannot connect to PostgreSQL") and out.stderr.count("\n") == 1, out.stderr


@pytest.mark.e2e
def test_postgresql_down_is_unavailable_and_not_serving_until_it_is_back(pg_cluster: PgCluster, pg_dsn: str) -> None:
    server = RegulatorServer(ServerConfig(port=0, metrics_port=None, store_dsn=pg_dsn, grace_seconds=1.0,
                                          limits=roomy_limits(store_timeout_s=5.0)))
    server.start()
    try:
        with RegulatorClient.connect(server.target, timeout=60) as client:
            client.open_session("job", ["a", "b"], "official")
            client.report("job", attempt=0, epoch=0, step=0, **STATS)
            pg_cluster.stop()
            try:
                with pytest.raises(Unavailable):
                    client.report("job", attempt=0, epoch=0, step=1, **STATS)
                wait_until(lambda: health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING")
            finally:
                pg_cluster.start()
            wait_until(lambda: health(server.target) == health_pb2.HealthCheckResponse.SERVING, "SERVING again")
            client.report("job", attempt=0, epoch=0, step=1, **STATS)
            assert client.get_session("job").session.steps == 2
    finally:
        server.stop(grace=0)
    store = PostgreSQLStore(pg_dsn)  # and it is all in the database
    manager = SessionManager(store)
    manager.restore()
    assert RegulatorClient.in_process(RegulatorAPI(manager)).get_session("job").session.steps == 2
    store.close()


def test_connections_the_server_dropped_while_idle_are_replaced_without_a_failed_call(pg_dsn: str) -> None:
    """A PostgreSQL restart (here: every regulator connection terminated) between two calls:
    the next write and read go through on new connections."""
    store = PostgreSQLStore(pg_dsn)
    store.create_session(_config("job"), 1, OPEN)
    store.append_step(SessionKey("job", 0), _record(0), 2)
    assert store.get_step(SessionKey("job", 0), 0) is not None
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        mine = "FROM pg_stat_activity WHERE application_name='inforeg-regulator' AND datname=current_database()"
        killed = admin.execute(f"SELECT pg_terminate_backend(pid) {mine}").fetchall()  # not another test's
        assert len(killed) >= 2  # the writer and a reader
        wait_until(lambda: not admin.execute(f"SELECT 1 {mine}").fetchall(), "gone")
    store.append_step(SessionKey("job", 0), _record(1), 3)
    assert store.get_step(SessionKey("job", 0), 1) is not None
    assert store.health() is None
    store.close()


def test_a_write_whose_connection_dies_mid_commit_is_settled_then_re_read(pg_dsn: str) -> None:
    """The server process of a write is terminated while the write runs: its outcome is unknown,
    so its job answers UNAVAILABLE until the store has reconnected (the server's store watch
    probes), then the job is re-read from the database and the retried Report is taken once."""
    store = PostgreSQLStore(pg_dsn, timeout_s=30)
    manager = SessionManager(store, limits=roomy_limits())
    manager.restore()
    client = RegulatorClient.in_process(RegulatorAPI(manager))
    client.open_session("job", ["a", "b"], "official")
    client.report("job", attempt=0, epoch=0, step=0, **STATS)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("CREATE FUNCTION slow() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(60); RETURN NEW; END $$ LANGUAGE plpgsql")
        admin.execute("CREATE TRIGGER slow BEFORE INSERT ON steps FOR EACH ROW EXECUTE FUNCTION slow()")
        failure: list[BaseException] = []

        def report() -> None:
            try:
                client.report("job", attempt=0, epoch=0, step=1, **STATS)
            except Unavailable as exc:
                failure.append(exc)

        reporter = threading.Thread(target=report)
        reporter.start()
        running = ("SELECT pid FROM pg_stat_activity WHERE application_name='inforeg-regulator' AND state='active' "
                   "AND datname=current_database() AND query LIKE 'INSERT INTO steps%%'")  # not another test's idle writer
        wait_until(lambda: admin.execute(running).fetchall(), "the write is running")
        admin.execute(f"SELECT pg_terminate_backend(pid) FROM ({running}) AS w")
        reporter.join(60)
        admin.execute("DROP TRIGGER slow ON steps")
    assert failure and "lost while committing" in str(failure[0])
    with pytest.raises(Unavailable):  # the job waits for the outcome
        client.report("job", attempt=0, epoch=0, step=1, **STATS)
    wait_until(lambda: manager.store_health(probe=True) is None and "job" not in manager.directory.in_doubt, "settled")
    assert not client.report("job", attempt=0, epoch=0, step=1, **STATS).duplicate  # it was not committed
    assert client.get_session("job").session.steps == 2
    store.close()


def test_retention_prunes_ended_sessions_steps_in_chunks_and_keeps_their_counts(stores: Stores) -> None:
    """``prune_steps`` on every store: only sessions ended before the cut, at most ``max_rows``
    a call, the step count and last step kept on the session."""
    from regulator_service.model import SessionStatus

    store = stores.open()
    for job in ("ended", "open", "skipped"):
        store.create_session(_config(job), 1, OPEN)
        for step in range(30):
            store.append_step(SessionKey(job, 0), _record(step), 2)
    for job in ("ended", "skipped"):
        store.set_status(SessionKey(job, 0), SessionStatus.CLOSED, 3)
    skip = frozenset({SessionKey("skipped", 0)})
    assert store.prune_steps(ended_before_ms=2, now_ms=10, max_rows=100, skip=skip) == []  # ended after the cut
    assert store.prune_steps(ended_before_ms=100, now_ms=10, max_rows=20, skip=skip) == []  # 20 of 30
    assert store.prune_steps(ended_before_ms=100, now_ms=11, max_rows=20, skip=skip) == [SessionKey("ended", 0)]
    ended = store.load_session(SessionKey("ended", 0))
    assert ended is not None and (ended.step_count, ended.last_step, ended.steps_pruned_ms) == (30, 29, 11)
    assert list(store.iter_steps(SessionKey("ended", 0))) == []
    for job in ("open", "skipped"):
        assert len(list(store.iter_steps(SessionKey(job, 0)))) == 30
    store.close()


def test_a_long_open_epoch_loads_whole_and_in_order(stores: Stores) -> None:
    """The open epoch's steps are found from the newest backwards, a page at a time on
    PostgreSQL (256, then 1024 steps): 700 of them come back whole, the closed epoch's not."""
    from dataclasses import replace

    from regulator_service.model import EpochSummary

    store = stores.open()
    key = SessionKey("long", 0)
    store.create_session(_config("long"), 1, OPEN)
    for step in range(800):
        if step == 100:
            store.close_epoch(key, EpochSummary.start(0, OPEN).close(), 1, OPEN, 2)
        store.append_step(key, replace(_record(step), epoch=0 if step < 100 else 1), 2)
    loaded = store.load_session(key)
    assert loaded is not None and loaded.open_epoch == 1 and loaded.step_count == 800
    assert [r.step for r in loaded.open_steps] == list(range(100, 800))
    assert [r.step for r in store.epoch_steps(key, 0)] == list(range(100))
    store.close()
