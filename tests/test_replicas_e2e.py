"""Faults with several `regulator serve` replicas on one real PostgreSQL, on loopback.

The replica serving a digits job is SIGKILLed mid-training: the job (wait mode, routed by job id)
moves to another replica once the dead one's lease lapses, and finishes with the weights, the
coefficients and the history of a fault-free run. A replica paused with SIGSTOP while another
takes its job over cannot write the job after SIGCONT. PostgreSQL stopped for a while: replicas
answer UNAVAILABLE with health NOT_SERVING, and the job continues after, nothing lost. The same
SIGKILL with a 2-rank DDP job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import grpc
import psycopg
import pytest
import torch
from grpc_health.v1 import health_pb2

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc
from regulator_client import RegulatorClient
from regulator_client.errors import Unavailable, retry_after_ms
from regulator_client.trace import TraceEpochEnd, read_trace
from trainers.digits import TrainConfig, train
from trainers.digits_data import load_split
from trainers.serverproc import ServerProcess

from .conftest import ROOT, data_file, health, read_jsonl, wait_until
from .postgres import PgCluster

pytestmark = pytest.mark.e2e

VIEWS = ("fac", "zer")
LEASE_TTL_S = 1.5
WAIT_S = 60.0  # a generous bound on every wait (a loaded machine), never an assertion on time


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_split(VIEWS)


class Replicas:
    """N replicas of `regulator serve --store DSN` (their logs under ``root``)."""

    def __init__(self, dsn: str, root: Path, n: int, *extra: str) -> None:
        self.dsn = dsn
        self.servers = [
            ServerProcess(
                str(root / f"unused{i}"), log_path=str(root / f"replica{i}.log"),
                extra_args=["--store", dsn, "--lease-ttl", str(LEASE_TTL_S), *extra],
            )
            for i in range(n)
        ]

    def start(self) -> "Replicas":
        with ThreadPoolExecutor(len(self.servers)) as pool:  # they start together, as a Deployment's pods
            list(pool.map(lambda s: s.start(), self.servers))
        return self

    @property
    def target(self) -> str:
        """Every replica in one target: the client routes each job to one of them."""
        return "ipv4:" + ",".join(s.target for s in self.servers)

    def owner(self, job: str) -> ServerProcess:
        """The replica holding the job's lease (its pid is in the lease's owner name)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT owner FROM leases WHERE job_id = %s", (job,)).fetchone()
        assert row is not None, f"no replica has taken job {job}"
        pid = int(row[0].split(":")[1])
        return next(s for s in self.servers if s.proc is not None and s.proc.pid == pid)

    def close(self) -> None:
        for s in self.servers:
            if s.proc is not None and s.proc.poll() is None:
                os.kill(s.proc.pid, signal.SIGCONT)  # a test that failed while one was paused
                s.proc.send_signal(signal.SIGTERM)  # all drain at once
        for s in self.servers:
            s.stop()


@pytest.fixture
def replicas(pg_cluster: PgCluster, tmp_path: Path) -> Iterator[Any]:
    made: list[Replicas] = []

    def make(n: int, *extra: str) -> Replicas:
        made.append(Replicas(pg_cluster.new_database(), tmp_path, n, *extra).start())
        return made[-1]

    yield make
    for r in made:
        r.close()


def job_history(client: RegulatorClient, job: str) -> tuple[list, list]:
    detail = client.get_session(job, include_steps=True)
    steps = [(r.step, r.fallback, [m.factors.proximal for m in r.modalities], [m.fisher for m in r.modalities]) for r in detail.steps]
    epochs = [(e.epoch, [m.fisher_trace for m in e.modalities], [m.window.open for m in e.modalities]) for e in detail.epochs]
    return steps, epochs


def reference_run(cfg: dict, job: str, digits: Any) -> tuple[dict, tuple[list, list]]:
    """The fault-free run (in process: both transports give the same bits, test_transport_equivalence)."""
    client = RegulatorClient.in_process()
    result = train(TrainConfig(job_id=job, **cfg), client, digits)
    return result, job_history(client, job)


def served_history(server: ServerProcess, job: str) -> tuple[list, list]:
    with RegulatorClient.connect(server.target) as client:
        return job_history(client, job)


class Killer:
    """SIGKILLs the replica serving ``job`` after step ``at_step``."""

    def __init__(self, reps: Replicas, job: str, at_step: int) -> None:
        self.reps, self.job, self.at_step = reps, job, at_step
        self.killed: Optional[ServerProcess] = None

    def __call__(self, step: int) -> None:
        if step == self.at_step:
            self.killed = self.reps.owner(self.job)
            self.killed.kill()


def test_sigkill_of_the_serving_replica_mid_training_loses_nothing(replicas: Any, digits: Any) -> None:
    cfg = dict(views=VIEWS, profile="official", seed=3, epochs=2, on_unavailable="wait", call_timeout=2.0, wait_timeout=WAIT_S)
    reference, ref_history = reference_run(cfg, "ha-kill", digits)
    reps = replicas(3)
    killer = Killer(reps, "ha-kill", at_step=37)  # mid-epoch 1
    with RegulatorClient.connect(reps.target, timeout=2.0) as client:
        result = train(TrainConfig(job_id="ha-kill", **cfg), client, digits, on_step=killer)
    assert killer.killed is not None
    survivors = [s for s in reps.servers if s is not killer.killed]
    new_owner = reps.owner("ha-kill")
    assert new_owner in survivors  # another replica took the job over
    assert result["fallback_steps"] == 0
    assert result["applied"] == reference["applied"]  # every coefficient applied, as without the fault
    assert result["weights_digest"] == reference["weights_digest"]  # bit-identical final weights
    assert served_history(new_owner, "ha-kill") == ref_history  # every step once, the same records


def _trace() -> list:
    return read_trace(data_file("trace_pix+mor_seed0.jsonl"))[1]


def _report(client: RegulatorClient, ev: Any) -> Any:
    """A trace event's call: a Report, or the EndEpoch that closes an epoch."""
    if isinstance(ev, TraceEpochEnd):
        return client.end_epoch("job", attempt=0, epoch=ev.epoch)
    return client.report("job", attempt=0, epoch=ev.epoch, step=ev.step, count=ev.count,
                         score_sums=ev.score_sum, fisher=ev.fisher)


def _report_when_served(client: RegulatorClient, ev: Any) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return _report(client, ev)
        except Unavailable:
            assert time.monotonic() < deadline, "the paused replica's lease never lapsed"
            time.sleep(0.05)


def test_a_replica_paused_while_another_takes_its_job_over_cannot_write_it(replicas: Any, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    reps = replicas(2, "--debug-hold-file", str(hold))
    a, b = reps.servers
    evs = _trace()[:80]
    with RegulatorClient.connect(a.target, timeout=WAIT_S) as ca, RegulatorClient.connect(b.target, timeout=5.0) as cb:
        ca.open_session("job", ["pix", "mor"], "official")
        for ev in evs[:50]:
            _report(ca, ev)
        assert reps.owner("job") is a
        hold.touch()  # a's next call waits in its server...
        held: dict[str, Any] = {}
        call = threading.Thread(target=lambda: held.update(error=_catch(lambda: _report(ca, evs[50]))))
        call.start()
        time.sleep(0.5)  # (the call reaches a's hold; if it were later, a's stop holds it in the kernel)
        os.kill(a.proc.pid, signal.SIGSTOP)  # ...and a stops: no renewals, no writes
        try:
            hold.unlink()  # b is not held: it takes the job once a's lease lapses (database clock)
            _report_when_served(cb, evs[50])
            for ev in evs[51:80]:
                _report(cb, ev)
            assert reps.owner("job") is b
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        call.join(WAIT_S)
        assert isinstance(held.get("error"), Unavailable), held  # a's held call: an error, never an answer
        with pytest.raises(Unavailable, match="another regulator replica"):
            _report(ca, evs[80 - 1])  # nor any later call of the job on a
        with grpc.insecure_channel(a.target) as channel:  # the answer says when to retry
            with pytest.raises(grpc.RpcError) as refused:
                regulator_pb2_grpc.RegulatorStub(channel).GetSession(pb.GetSessionRequest(job_id="job"), timeout=WAIT_S)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 0 < (retry_after_ms(refused.value) or 0) <= LEASE_TTL_S * 1000
    with RegulatorClient.connect(b.target) as client:
        detail = client.get_session("job", include_steps=True)
    assert [r.step for r in detail.steps] == [ev.step for ev in evs if not isinstance(ev, TraceEpochEnd)]  # every step once
    ref = RegulatorClient.in_process()
    ref.open_session("job", ["pix", "mor"], "official")
    for ev in evs:
        _report(ref, ev)
    with RegulatorClient.connect(b.target) as client:  # replayed: the answers a fault-free run stored
        assert [_report(client, ev) for ev in evs[-3:]] == [_report(ref, ev) for ev in evs[-3:]]


def _catch(fn: Any) -> Optional[BaseException]:
    try:
        fn()
    except Exception as exc:
        return exc
    return None


def test_postgresql_down_for_ten_seconds_the_replicas_wait_and_the_job_continues(
    replicas: Any, pg_cluster: PgCluster, digits: Any,
) -> None:
    cfg = dict(views=VIEWS, profile="official", seed=3, epochs=2, on_unavailable="wait", call_timeout=2.0, wait_timeout=WAIT_S)
    reference, ref_history = reference_run(cfg, "ha-pg", digits)
    reps = replicas(2, "--health-port", "0")
    seen: dict[str, Any] = {}

    def outage(step: int) -> None:
        if step != 20:
            return
        pg_cluster.stop()
        try:
            began = time.monotonic()
            wait_until(
                lambda: all(health(s.target) == health_pb2.HealthCheckResponse.NOT_SERVING for s in reps.servers),
                "every replica's readiness says NOT_SERVING", timeout=WAIT_S,
            )
            for i, s in enumerate(reps.servers):  # a write on any replica: UNAVAILABLE, which clients retry
                with RegulatorClient.connect(s.target, timeout=WAIT_S) as direct:
                    seen.setdefault("errors", []).append(_catch(lambda: direct.open_session(f"probe{i}", ["a", "b"], "official")))
            time.sleep(max(0.0, 10 - (time.monotonic() - began)))
        finally:
            pg_cluster.start()

    with RegulatorClient.connect(reps.target, timeout=2.0) as client:
        result = train(TrainConfig(job_id="ha-pg", **cfg), client, digits, on_step=outage)
    assert [type(e) for e in seen["errors"]] == [Unavailable, Unavailable]
    assert result["fallback_steps"] == 0
    assert result["applied"] == reference["applied"]
    assert result["weights_digest"] == reference["weights_digest"]
    assert served_history(reps.owner("ha-pg"), "ha-pg") == ref_history


def _torchrun(target: str, out: Path, job: str) -> "subprocess.Popen[str]":
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "trainers.digits_ddp", "--target", target, "--job-id", job, "--profile", "official",
         "--epochs", "2", "--seed", "2", "--on-unavailable", "wait", "--call-timeout", "2",
         "--coef-log", str(out / "coefs"), "--save-weights", str(out / "weights.pt")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )


def _steps_recorded(dsn: str, job: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM steps WHERE job_id = %s", (job,)).fetchone()[0])


def test_sigkill_of_the_serving_replica_mid_ddp_training_loses_nothing(replicas: Any, tmp_path: Path) -> None:
    """A 2-rank DDP job (one Report per step, from its leader): the same, bit for bit, as the
    same DDP job on a regulator that never failed (both run at once)."""
    reps = replicas(3)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ha").mkdir()
    with ServerProcess() as ref_server:
        ref = _torchrun(ref_server.target, tmp_path / "ref", "ddp-ha")
        ha = _torchrun(reps.target, tmp_path / "ha", "ddp-ha")
        try:
            wait_until(lambda: _steps_recorded(reps.dsn, "ddp-ha") >= 15 or ha.poll() is not None,
                       "the DDP job has recorded 15 of its 50 steps", timeout=WAIT_S * 3)
            killed = reps.owner("ddp-ha")
            killed.kill()
            assert _steps_recorded(reps.dsn, "ddp-ha") < 50, "the job finished before the kill"
            for proc in (ref, ha):
                out, _ = proc.communicate(timeout=WAIT_S * 5)
                assert proc.returncode == 0, out
        finally:
            for proc in (ref, ha):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        ref_history = served_history(ref_server, "ddp-ha")
    assert reps.owner("ddp-ha") is not killed
    for rank in range(2):  # every coefficient applied on every rank, as without the fault
        assert read_jsonl(tmp_path / "ha" / "coefs" / f"rank{rank}.jsonl") == read_jsonl(tmp_path / "ref" / "coefs" / f"rank{rank}.jsonl")
    want, got = torch.load(tmp_path / "ref" / "weights.pt"), torch.load(tmp_path / "ha" / "weights.pt")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # bit-identical weights
    assert served_history(reps.owner("ddp-ha"), "ddp-ha") == ref_history  # every step once
