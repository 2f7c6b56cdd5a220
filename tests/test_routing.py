"""Routing by job (client/routing.py): with a target naming several replicas, each job's calls
land on one replica, chosen by a hash of its job id, and move to another one when it dies.

The end-to-end tests run three real ``regulator serve`` processes (independent SQLite state
directories, so where a session lives says where its calls went: a Report that reached another
replica would be NOT_FOUND there) and read each one's sessions with ListSessions. The oldest
supported grpcio (1.63.0) has no request-header hash: there the client keeps gRPC's pick_first
and says so, and no job's calls are spread.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from regulator_client import RegulatorClient, Unavailable
from regulator_client.errors import InvalidArgument
from regulator_client.routing import (
    HASH_KEY_ENV,
    JOB_HEADER,
    RING_HASH,
    ROUTING_ENV,
    job_metadata,
    plan_routing,
    replicas_named,
    routing_for,
)
from regulator_client.transport import DEFAULT_SERVICE_CONFIG
from trainers.serverproc import ServerProcess, launch, regulator_command

from . import oldest_env

THREE = "ipv4:127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"
JOBS = [f"route-{i}" for i in range(12)]
REPORTS = 3  # per job, besides its OpenSession and EndEpoch: 5 calls


# -- the plan (no network) ----------------------------------------------------------------------


def test_several_replicas_are_routed_by_job_on_a_grpcio_with_the_header_hash() -> None:
    env: dict[str, str] = {}
    routing = routing_for(THREE, env)
    assert routing.by_job and routing.reason == "3 replicas"
    assert env == {HASH_KEY_ENV: "true"}  # set for gRPC core, before the channel parses its config
    config = routing.service_config(DEFAULT_SERVICE_CONFIG)
    assert config["loadBalancingConfig"] == [RING_HASH]
    assert config["methodConfig"] == DEFAULT_SERVICE_CONFIG["methodConfig"]  # retries kept
    assert RING_HASH["ring_hash_experimental"]["requestHashHeader"] == JOB_HEADER


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "ipv4:127.0.0.1:5", "localhost:50051", "unix:/tmp/r.sock"])
def test_one_replica_keeps_grpc_defaults(target: str) -> None:
    env: dict[str, str] = {}
    routing = routing_for(target, env)
    assert not routing.by_job and env == {}
    assert routing.service_config(DEFAULT_SERVICE_CONFIG) is DEFAULT_SERVICE_CONFIG


def test_the_environment_forces_or_turns_off_routing_and_a_bad_value_is_named() -> None:
    assert plan_routing("127.0.0.1:50051", {ROUTING_ENV: "job"}).by_job  # a Service with one pod today
    assert not plan_routing(THREE, {ROUTING_ENV: "off"}).by_job
    with pytest.raises(ValueError, match="REGULATOR_ROUTING='ring': expected one of auto, job, off"):
        plan_routing(THREE, {ROUTING_ENV: "ring"})
    chosen = {"loadBalancingConfig": [{"round_robin": {}}]}  # a caller's own policy wins
    assert plan_routing(THREE, {}).service_config(chosen) is chosen


@pytest.mark.parametrize("version", ["1.63.0", "1.69.0"])
def test_a_grpcio_without_the_header_hash_falls_back_with_a_warning(
    version: str, caplog: pytest.LogCaptureFixture
) -> None:
    routing = plan_routing(THREE, {}, version=version)
    assert not routing.by_job and f"grpcio {version} cannot hash on a request header" in routing.reason
    assert plan_routing(THREE, {}, version="1.70.0").by_job  # the first release that can (measured)
    assert not plan_routing(THREE, {HASH_KEY_ENV: "false"}).by_job  # the user turned gRPC's switch off
    with caplog.at_level(logging.WARNING, "regulator_client.routing"):
        routing_for(THREE, {HASH_KEY_ENV: "false"})
    assert "names several replicas" in caplog.text and "none is spread" in caplog.text


def test_replicas_named_counts_address_lists_and_dns_records() -> None:
    assert replicas_named(THREE) == 3
    assert replicas_named("ipv6:[::1]:1,[::1]:2") == 2
    assert replicas_named("localhost:50051") == 1  # one record per family: one replica
    assert replicas_named("dns:///no-such-host.invalid:50051") == 1
    with pytest.raises(InvalidArgument, match="115587 is not a port"):  # not port 50051 of another service
        replicas_named("ipv4:127.0.0.1:50051,127.0.0.1:115587")


def test_every_call_about_a_job_carries_its_id_and_nothing_else_does() -> None:
    assert job_metadata("digits-7") == ((JOB_HEADER, "digits-7"),)
    assert job_metadata("bad\njob") == ()  # the server refuses it with INVALID_ARGUMENT, not gRPC
    assert job_metadata("") == ()


# -- three real replicas --------------------------------------------------------------------------


@contextlib.contextmanager
def replicas(tmp_path: Path, n: int = 3) -> Iterator[list[ServerProcess]]:
    servers = [ServerProcess(state_dir=str(tmp_path / f"state{i}"), log_path=str(tmp_path / f"r{i}.log")) for i in range(n)]
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in servers:
            s.stop()


def address_list(servers: list[ServerProcess]) -> str:
    return "ipv4:" + ",".join(s.target for s in servers)


def sessions_on(server: ServerProcess) -> dict[str, int]:
    """job id -> steps recorded, as that replica lists its sessions."""
    with RegulatorClient.connect(server.target, timeout=30) as one:
        return {s.job_id: s.steps for s in one.list_sessions(include_inactive=True)}


def where(servers: list[ServerProcess]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for i, s in enumerate(servers):
        for job in sessions_on(s):
            found.setdefault(job, []).append(i)
    return found


def report(client: RegulatorClient, job: str, step: int, epoch: int = 0) -> None:
    client.report(job, attempt=0, epoch=epoch, step=step, count=4, score_sums={"a": 3.0, "v": 1.0}, fisher={"a": 0.5, "v": 0.25})


def run_job(client: RegulatorClient, job: str, first_step: int = 0) -> None:
    client.open_session(job, ["a", "v"])
    for step in range(first_step, first_step + REPORTS):
        report(client, job, step)


@pytest.mark.e2e
def test_each_jobs_calls_land_on_one_replica_and_move_when_it_dies(tmp_path: Path) -> None:
    with replicas(tmp_path) as servers, RegulatorClient.connect(address_list(servers), timeout=30) as client:
        assert client.transport.routing.by_job
        for job in JOBS:
            run_job(client, job)
            client.end_epoch(job, attempt=0, epoch=0)
        before = where(servers)
        assert sorted(before) == sorted(JOBS)
        assert all(len(on) == 1 for on in before.values()), before  # never spread
        for i, s in enumerate(servers):  # all 5 calls of each job reached its one replica
            assert all(steps == REPORTS for steps in sessions_on(s).values()), (i, sessions_on(s))
        counts = [sum(1 for on in before.values() if on == [i]) for i in range(3)]
        # the ring spreads jobs (all 12 on one replica: odds about 6 in a million)
        assert sum(1 for c in counts if c) >= 2, counts

        victim = max(range(3), key=lambda i: counts[i])
        servers[victim].kill()
        moved = [job for job, on in before.items() if on == [victim]]
        stayed = [job for job in JOBS if job not in moved]
        for job in moved:  # the first call after the kill may find the dead replica: retried here
            deadline = time.monotonic() + 60
            while True:
                try:
                    run_job(client, job)
                    break
                except Unavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        for job in stayed:  # their sessions are where they were: a report anywhere else is NOT_FOUND
            client.open_session(job, ["a", "v"])  # the same configuration: the same session
            report(client, job, REPORTS, epoch=1)  # its epoch 0 was closed there
        survivors = [s for i, s in enumerate(servers) if i != victim]
        after = where(survivors)
        for job in moved:
            assert len(after[job]) == 1, after  # moved to one other replica, not spread
            assert sessions_on(survivors[after[job][0]])[job] == REPORTS
        for job in stayed:
            assert [survivors[after[job][0]].target] == [servers[before[job][0]].target]
            assert sessions_on(survivors[after[job][0]])[job] == REPORTS + 1


@pytest.mark.e2e
def test_the_oldest_grpcio_keeps_every_job_on_one_replica_and_says_why(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    old_python = oldest_env.oldest_venv(request.config.cache.mkdir("oldest-client-venv"))
    script = (
        "import sys\n"
        "from regulator_client import RegulatorClient\n"
        "c = RegulatorClient.connect(sys.argv[1], timeout=30)\n"
        "assert not c.transport.routing.by_job, c.transport.routing\n"
        f"for j in {JOBS!r}:\n"
        "    c.open_session(j, ['a', 'v'])\n"
        "    c.report(j, attempt=0, epoch=0, step=0, count=4, score_sums={'a': 3.0, 'v': 1.0}, fisher={'a': 0.5, 'v': 0.25})\n"
    )
    with replicas(tmp_path) as servers:
        done = oldest_env.run_old(old_python, "-c", script, address_list(servers), timeout=120)
        assert done.returncode == 0, done.stderr
        assert "grpcio 1.63.0 cannot hash on a request header" in done.stderr
        found = where(servers)
    assert sorted(found) == sorted(JOBS) and len({tuple(on) for on in found.values()}) == 1, found  # pick_first


# -- three replicas sharing one PostgreSQL: a job continues where it moved ----------------------


@contextlib.contextmanager
def pg_replicas(tmp_path: Path, dsn: str, n: int = 3) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    started: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for i in range(n):
            ready, log = tmp_path / f"ready{i}.json", tmp_path / f"pg{i}.log"
            cmd = regulator_command(ready, "--metrics-port", "-1", "--store", dsn, "--lease-ttl", "2")
            with open(log, "wb") as out:
                proc, info = launch(cmd, ready, stdout=out, stderr=subprocess.STDOUT)
            started.append((proc, f"127.0.0.1:{info['port']}"))
        yield started
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)


def owners(dsn: str) -> dict[str, int]:
    """job id -> pid of the replica holding its lease (owner ids are host:pid:nonce)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT job_id, owner FROM leases").fetchall()
    return {job: int(owner.split(":")[1]) for job, owner in rows}


def until_served(call: Callable[[], None], timeout: float = 60.0) -> None:
    """``call`` until a replica serves it: a dead replica's lease lapses first (--lease-ttl)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.e2e
def test_with_a_shared_postgresql_a_dead_replicas_jobs_continue_on_the_next(tmp_path: Path, pg_dsn: str) -> None:
    with pg_replicas(tmp_path, pg_dsn) as servers, RegulatorClient.connect(
        "ipv4:" + ",".join(t for _, t in servers), timeout=30
    ) as client:
        for job in JOBS:  # a call routed to a replica that does not hold the job's lease would fail
            run_job(client, job)
        before = owners(pg_dsn)
        assert sorted(before) == sorted(JOBS)
        pids = [p.pid for p, _ in servers]
        per_replica = {pid: [j for j, o in before.items() if o == pid] for pid in pids}
        assert sum(1 for jobs in per_replica.values() if jobs) >= 2, per_replica  # the ring spreads jobs

        victim = max(pids, key=lambda pid: len(per_replica[pid]))
        next(p for p, _ in servers if p.pid == victim).kill()
        for job in JOBS:  # every job goes on with its next steps, wherever it is served now
            for n in range(REPORTS, REPORTS + 2):
                until_served(lambda: report(client, job, n))
        after = owners(pg_dsn)
        for job in JOBS:
            if job in per_replica[victim]:
                assert after[job] in pids and after[job] != victim, (job, after[job])
            else:
                assert after[job] == before[job], job  # the other jobs stayed where they were
            steps = [s.step for s in client.steps(job, 0)]
            assert steps == list(range(REPORTS + 2)), (job, steps)  # every step once, in order
