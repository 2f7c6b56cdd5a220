"""A retried pod continues its job (issue 12 item 1).

A Kubernetes Job retries a failed pod as a new pod with the same job id, whose torchrun counts
restarts from 0 again. The regulator assigns such a process the next attempt
(``OpenSessionRequest.next_attempt``, idempotent per ``open_token``), and the digits trainer
resumes from its checkpoint, so that running the same command again after a kill -9 finishes
the job, with both attempts in the history and the result of an uninterrupted run.
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
from regulator_client import JobIdentity, RegulatorClient
from regulator_client.errors import InvalidArgument
from regulator_service.edge.server import RegulatorServer, ServerConfig

from .conftest import ROOT, roomy_limits

SCRIPTS = ROOT / "tests" / "scripts"


def open_req(job: str, **fields: Any) -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(job_id=job, modalities=["a", "b"], profile=pb.Profile(official=pb.OfficialProfile()), **fields)


def test_next_attempt_is_assigned_and_idempotent_per_opener_token(tmp_path: Path) -> None:
    config = ServerConfig(port=0, metrics_port=None, state_dir=tmp_path / "state", grace_seconds=1.0, limits=roomy_limits())
    with RegulatorServer(config) as server, RegulatorClient.connect(server.target, timeout=30) as client:
        t = client.transport
        first = t.open_session(open_req("job", next_attempt=True, open_token="pod-a"))
        assert (first.session.attempt, first.created) == (0, True)  # a new job starts at 0
        again = t.open_session(open_req("job", next_attempt=True, open_token="pod-a"))
        assert (again.session.attempt, again.created) == (0, False)  # a retried request, not a new attempt
        retried = t.open_session(open_req("job", next_attempt=True, open_token="pod-b"))
        assert (retried.session.attempt, retried.created) == (1, True)  # the retried pod
        assert client.get_session("job", 0).session.state == pb.SESSION_STATE_SUPERSEDED
        # A rank that learnt the number joins it explicitly; the token is no part of the identity.
        assert not t.open_session(open_req("job", attempt=1)).created
        untokened = t.open_session(open_req("job", next_attempt=True))
        assert (untokened.session.attempt, untokened.created) == (2, True)  # no token: always a new one

        for bad, needle in (
            (open_req("job", next_attempt=True, attempt=3), "attempt must be 0 with next_attempt"),
            (open_req("job", attempt=2, open_token="x"), "only meaningful with next_attempt"),
            (open_req("job", next_attempt=True, open_token="has space"), "open_token"),
            (open_req("job", next_attempt=True, open_token="x" * 129), "open_token"),
        ):
            with pytest.raises(InvalidArgument, match=needle):
                t.open_session(bad)
        assert [s.attempt for s in client.list_sessions(include_inactive=True) if s.job_id == "job"] == [0, 1, 2]

    # The token is durable: after a restart the retried request still gets its attempt.
    with RegulatorServer(config) as server, RegulatorClient.connect(server.target, timeout=30) as client:
        t = client.transport
        t.open_session(open_req("tok", next_attempt=True, open_token="p1"))
    with RegulatorServer(config) as server, RegulatorClient.connect(server.target, timeout=30) as client:
        t = client.transport
        assert t.open_session(open_req("tok", next_attempt=True, open_token="p1")).created is False
        assert t.open_session(open_req("tok", next_attempt=True, open_token="p2")).session.attempt == 1


def test_attempt_resolution() -> None:
    env = {"REGULATOR_JOB_ID": "j"}
    assert JobIdentity.resolve(env=env) == JobIdentity("j", 0, 0, 1, next_attempt=True)  # one process: assigned
    assert JobIdentity.resolve(env={**env, "REGULATOR_ATTEMPT": "next", "TORCHELASTIC_RESTART_COUNT": "2"}).next_attempt
    assert JobIdentity.resolve(env={**env, "REGULATOR_ATTEMPT": "4"}) == JobIdentity("j", 4, 0, 1)
    assert JobIdentity.resolve(env={**env, "TORCHELASTIC_RESTART_COUNT": "2"}) == JobIdentity("j", 2, 0, 1)
    assert JobIdentity.resolve(attempt=3, env={**env, "REGULATOR_ATTEMPT": "next"}) == JobIdentity("j", 3, 0, 1)
    assert JobIdentity.resolve(attempt="next", env=env).assigned(7) == JobIdentity("j", 7, 0, 1)
    # Ranks that cannot share an assigned number (no process group) keep the old default...
    assert JobIdentity.resolve(env={**env, "RANK": "1", "WORLD_SIZE": "2"}) == JobIdentity("j", 0, 1, 2)
    # ... and refuse to be told to.
    with pytest.raises(ValueError, match="torch.distributed"):
        JobIdentity.resolve(env={**env, "RANK": "1", "WORLD_SIZE": "2", "REGULATOR_ATTEMPT": "next"})
    for bad in ("-1", "soon", "1.5"):
        with pytest.raises(ValueError, match="REGULATOR_ATTEMPT"):
            JobIdentity.resolve(env={**env, "REGULATOR_ATTEMPT": bad})


def test_hooks_of_a_job_run_twice_are_consecutive_attempts() -> None:
    """Without a checkpoint the second run is a fresh attempt (not ALREADY_EXISTS on its first step)."""
    import torch
    from torch import nn

    from regulator_client.hook import InfoRegHook

    client = RegulatorClient.in_process()
    enc = {"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)}
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    for expected in (0, 1):
        hook = InfoRegHook(client, enc, job_id="twice", profile="official")
        with hook:
            hook.on_epoch_start(0)
            logits = {k: m(x) for k, m in enc.items()}
            sum(nn.functional.cross_entropy(v, y) for v in logits.values()).backward()
            assert hook.after_backward(logits=logits, labels=y).step == 0
        assert hook.identity.attempt == expected and not hook.identity.next_attempt


def trainer(args: list[str], crash_at: int | None = None) -> subprocess.CompletedProcess[str]:
    prefix = [str(SCRIPTS / "digits_killed.py"), str(crash_at), "--"] if crash_at is not None else ["-m", "trainers.digits"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGULATOR_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *prefix, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_a_job_killed_mid_epoch_and_run_again_finishes_as_the_next_attempt(tmp_path: Path) -> None:
    """Real processes: `regulator serve` (SQLite), the digits trainer kill -9'ed at step 37 (epoch
    1 of 3, 25 steps each), then the very same command again. The second run resumes at its
    epoch-1 checkpoint as attempt 1, inheriting epoch 0; the job finishes with the weights and
    the per-step history of an uninterrupted run (trained here in the test's process), and the
    history shows both attempts."""
    from trainers.digits import TrainConfig, train
    from trainers.serverproc import ServerProcess

    with ServerProcess(str(tmp_path / "state")) as server:
        command = ["--target", server.target, "--profile", "official", "--epochs", "3", "--seed", "5", "--job-id", "retried",
                   "--checkpoint", str(tmp_path / "ckpt" / "digits.pt"), "--out", str(tmp_path / "retried.json")]

        killed = trainer(command, crash_at=37)
        assert killed.returncode == -9, killed.stderr
        assert not (tmp_path / "retried.json").exists()
        again = trainer(command)
        assert again.returncode == 0, again.stderr
        assert "resuming job retried at epoch 1 (step 25)" in again.stderr
        with RegulatorClient.connect(server.target) as client:
            uninterrupted = train(TrainConfig(profile="official", epochs=3, seed=5, job_id="uninterrupted"), client)

        resumed = json.loads((tmp_path / "retried.json").read_text())
        assert (resumed["attempt"], resumed["resumed_at_epoch"]) == (1, 1)
        assert resumed["weights_digest"] == uninterrupted["weights_digest"]  # bit-identical model
        assert resumed["applied"] == uninterrupted["applied"][25:]  # every coefficient of epochs 1-3

        with RegulatorClient.connect(server.target) as client:
            attempts = [s for s in client.list_sessions(include_inactive=True) if s.job_id == "retried"]
            assert [(s.attempt, s.state) for s in attempts] == [(0, pb.SESSION_STATE_SUPERSEDED), (1, pb.SESSION_STATE_CLOSED)]
            killed_attempt = client.get_session("retried", 0, include_steps=True)
            assert killed_attempt.session.last_step == 37 and killed_attempt.session.epoch == 1  # died mid-epoch 1
            final = client.get_session("retried", include_steps=True)
            ref = client.get_session("uninterrupted", include_steps=True)
        assert final.session.attempt == 1 and final.session.resume_epoch == 1
        assert list(final.epochs) == list(ref.epochs)  # epoch 0 inherited, 1-3 recorded again: all as uninterrupted
        assert [s.step for s in final.steps] == list(range(25, 75))
        assert list(final.steps) == list(ref.steps)[25:]
        # The killed attempt's epoch-1 steps were recorded, then redone by attempt 1 from the
        # checkpoint. Its last step's Fisher value was still pending (it travels with the next
        # step's Report), so that step matches in its scores and coefficients.
        assert list(killed_attempt.steps)[25:37] == list(ref.steps)[25:37]
        last, same = killed_attempt.steps[37], ref.steps[37]
        assert [(m.score_sum, m.factors) for m in last.modalities] == [(m.score_sum, m.factors) for m in same.modalities]


def test_checkpoint_of_another_job_is_refused(tmp_path: Path) -> None:
    from trainers.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    path = tmp_path / "c.pt"
    assert load_checkpoint(path, {"seed": 1}) is None
    save_checkpoint(path, Checkpoint("j", 2, 50, {"seed": 1, "views": ["fac", "zer"]}, {}, {}, {}))
    assert load_checkpoint(path, {"seed": 1, "views": ["fac", "zer"]}).epoch == 2  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="seed: 1 -> 2"):
        load_checkpoint(path, {"seed": 2, "views": ["fac", "zer"]})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
