"""The sidecar deployment's claims, with real processes (issue 12 items 2 and 4):

- a sidecar's history dies with its pod, and the trainer's statistics trace (``--record``, on a
  volume that outlives the pod) gives it back, in any regulator;
- a DDP job over two pods with one regulator each (two torchrun agents, c10d rendezvous): every
  rank applies the same coefficients, the leader's regulator holds the whole history, the other
  only the session, and both agree on the attempt the leader's regulator assigned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from trainers.serverproc import ServerProcess

from .conftest import ROOT, free_port, read_jsonl

pytestmark = pytest.mark.e2e


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGULATOR_", "TORCHELASTIC_"))}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def epochs_of(target: str, job: str, attempt: int | None = None) -> list[Any]:
    with RegulatorClient.connect(target) as client:
        return list(client.get_session(job, attempt).epochs)


def test_the_sidecars_history_comes_back_from_the_trace(tmp_path: Path) -> None:
    """Train through an in-memory regulator (the sidecar's emptyDir), stop it: the history is
    gone. Replaying the trace into another regulator gives the coefficients the trainer applied,
    step by step, and the epochs (Fisher traces, windows) the first regulator had."""
    trace, out = tmp_path / "results" / "trace.jsonl", tmp_path / "results" / "result.json"
    with ServerProcess(None) as sidecar:
        proc = subprocess.run(
            [sys.executable, "-m", "trainers.digits", "--target", sidecar.target, "--profile", "official", "--epochs", "3",
             "--seed", "4", "--job-id", "sidecar-job", "--record", str(trace), "--out", str(out)],
            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        lost = epochs_of(sidecar.target, "sidecar-job")
    applied = json.loads(out.read_text())["applied"]
    assert len(applied) == 75 and any(c > 0 for step in applied for c in step)

    with ServerProcess(str(tmp_path / "central")) as central:
        proc = subprocess.run(
            [sys.executable, "-m", "regulator_cli", "replay", str(trace), "--profile", "official", "--job-id", "sidecar-job",
             "--target", central.target, "-o", str(tmp_path / "replay.jsonl")],
            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        replayed = read_jsonl(tmp_path / "replay.jsonl")
        assert [[line["factors"][v] for v in ("fac", "zer")] for line in replayed] == applied  # bit for bit
        restored = epochs_of(central.target, "sidecar-job")
    key = lambda e: (e.epoch, e.closed, e.steps, [(m.modality, m.fisher_trace, m.window.open) for m in e.modalities])  # noqa: E731
    assert [key(e) for e in restored] == [key(e) for e in lost]



def run_two_pods(targets: list[str], logs: list[Path], job: str) -> None:
    """Two torchrun agents ("pods"), one rank each, joined by a c10d rendezvous, each rank with
    its own REGULATOR_TARGET: the command line of deploy/k8s/examples/multi-pod-ddp."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint={endpoint}", f"--rdzv-id={job}", "--max-restarts=0",
             "-m", "trainers.digits_ddp", "--profile", "official", "--epochs", "1", "--seed", "3", "--coef-log", str(log)],
            cwd=ROOT, env=clean_env(REGULATOR_TARGET=target, REGULATOR_ATTEMPT="next"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for target, log in zip(targets, logs)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out


def test_multi_pod_ddp_with_a_regulator_per_pod(tmp_path: Path) -> None:
    with ServerProcess(None) as reg_a, ServerProcess(None) as reg_b:
        targets = [reg_a.target, reg_b.target]
        # An earlier run of the job left attempt 0 in both regulators: this run is attempt 1,
        # assigned by the leader's regulator and opened by the other rank at its own.
        for target in targets:
            with RegulatorClient.connect(target) as client:
                client.open_session("mp-job", ["fac", "zer"], "official", attempt=0)
        logs = [tmp_path / pod for pod in ("pod-a", "pod-b")]
        run_two_pods(targets, logs, "mp-job")
        # Every rank applied the same coefficient at every step.
        applied = {}
        for log in logs:
            (rank_file,) = log.glob("rank*.jsonl")
            applied[rank_file.name] = [(r["step"], r["proximal"]) for r in read_jsonl(rank_file)]
        assert sorted(applied) == ["rank0.jsonl", "rank1.jsonl"]
        assert applied["rank0.jsonl"] == applied["rank1.jsonl"] and len(applied["rank0.jsonl"]) == 25
        assert any(c > 0 for _, coefs in applied["rank0.jsonl"] for c in coefs.values())
        # c10d decides which pod hosts rank 0: that pod's regulator has the job's history.
        leader = targets[[i for i, log in enumerate(logs) if (log / "rank0.jsonl").exists()][0]]
        other = targets[1 - targets.index(leader)]
        sessions = {}
        for target in targets:
            with RegulatorClient.connect(target) as client:
                sessions[target] = client.get_session("mp-job").session
                assert client.get_session("mp-job", 0).session.state == pb.SESSION_STATE_SUPERSEDED
        assert sessions[leader].attempt == sessions[other].attempt == 1  # agreed through the process group
        assert (sessions[leader].steps, sessions[leader].epoch, sessions[leader].state) == (25, 1, pb.SESSION_STATE_CLOSED)
        assert sessions[other].steps == 0  # only the leader reports
        assert [e.closed for e in epochs_of(leader, "mp-job")] == [True, False]
