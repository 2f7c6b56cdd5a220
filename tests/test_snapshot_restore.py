"""Regulation survives preemption with a sidecar (issue 18 item 2).

A job that resumes from its own checkpoint continues regulation exactly even when its regulator
starts empty: the hook's ``state_dict`` carries the session's profile and closed epochs
(``OpenSessionRequest.snapshot``), a regulator that holds no attempt of the job restores them
(marked ``restored``), one that holds the job never lets a snapshot overwrite its history, and a
bad snapshot is INVALID_ARGUMENT with nothing stored. Real gRPC servers with SQLite state, real
`regulator serve` processes, real training killed with SIGKILL.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.errors import FailedPrecondition, InvalidArgument, NotFound
from regulator_service.edge.server import RegulatorServer, ServerConfig

from .conftest import ROOT, read_jsonl, roomy_limits
from .postgres import Stores
from .test_frameworks import steps_of
from .test_hook_checkpoint import EPOCHS, STEPS_PER_EPOCH, run

MODS = ["a", "b"]
HISTORY2 = pb.Profile(official=pb.OfficialProfile(history=2))


def serving(state_dir: Path) -> RegulatorServer:
    return RegulatorServer(ServerConfig(port=0, metrics_port=None, state_dir=state_dir, grace_seconds=1.0, limits=roomy_limits()))


@pytest.fixture
def connect(tmp_path: Path) -> Iterator[Callable[[str], RegulatorClient]]:
    """``connect(name)``: a client of a real regulator with its own state directory ``name``
    (started on first use, so that each name is a regulator of its own)."""
    servers: dict[str, RegulatorServer] = {}
    clients: list[RegulatorClient] = []

    def get(name: str) -> RegulatorClient:
        if name not in servers:
            servers[name] = serving(tmp_path / name).start()
        clients.append(RegulatorClient.connect(servers[name].target, timeout=30.0))
        return clients[-1]

    yield get
    for c in clients:
        c.close()
    for s in servers.values():
        s.stop(grace=0)


def open_req(job: str, resume_epoch: int = 0, snapshot: pb.SessionSnapshot | None = None, **fields: Any) -> pb.OpenSessionRequest:
    fields = {"next_attempt": True, **fields}
    req = pb.OpenSessionRequest(job_id=job, modalities=MODS, profile=HISTORY2, resume_epoch=resume_epoch, **fields)
    if snapshot is not None:
        req.snapshot.CopyFrom(snapshot)
    return req


def recorded_snapshot(client: RegulatorClient, job: str, epochs: int = 4, scale: float = 1.0) -> pb.SessionSnapshot:
    """Runs ``epochs`` epochs of 3 steps through the regulator; the snapshot of their closed epochs
    as the hook keeps it (the EndEpoch answers, the resolved profile). Rising traces keep the
    official windows open for some epochs and closed for others."""
    info = client.transport.open_session(open_req(job)).session
    snap = pb.SessionSnapshot(modalities=MODS, profile=info.profile)
    step = 0
    for e in range(epochs):
        for _ in range(3):
            stats = [pb.ModalityStats(modality="a", score_sum=3.0, fisher=scale * (1.0 + step * step)),
                     pb.ModalityStats(modality="b", score_sum=1.5, fisher=2.0)]
            client.transport.report(pb.ReportRequest(job_id=job, attempt=info.attempt, epoch=e, step=step, count=4, stats=stats))
            step += 1
        snap.epochs.append(client.end_epoch(job, attempt=info.attempt, epoch=e).closed)
    return snap


def epochs_of(client: RegulatorClient, job: str, attempt: int | None = None) -> list[tuple]:
    return [(e.epoch, e.closed, e.steps, tuple((m.fisher_trace, m.window.open, repr(m.window.growth)) for m in e.modalities))
            for e in client.get_session(job, attempt).epochs]


def test_a_regulator_that_does_not_hold_the_job_restores_its_snapshot(connect: Callable[[str], RegulatorClient]) -> None:
    a = connect("a")
    snap = recorded_snapshot(a, "job", epochs=4)
    reference = recorded_snapshot(a, "ref", epochs=5)  # the same job, uninterrupted
    b = connect("b")
    with pytest.raises(FailedPrecondition, match="no previous attempt.*no snapshot"):
        b.transport.open_session(open_req("job", resume_epoch=3))  # the measured failure, without one
    resumed = b.transport.open_session(open_req("job", resume_epoch=3, snapshot=pb.SessionSnapshot(
        modalities=MODS, profile=snap.profile, epochs=snap.epochs[:3])))
    assert (resumed.created, resumed.session.attempt, resumed.session.epoch, resumed.session.resume_epoch) == (True, 0, 3, 3)
    assert list(resumed.session.window) == [m.window for m in reference.epochs[3].modalities]  # as uninterrupted
    # the rest of the ranks (or a retried request) join it: the snapshot agrees, nothing changes
    assert not b.transport.open_session(open_req("job", resume_epoch=3, snapshot=pb.SessionSnapshot(
        modalities=MODS, profile=snap.profile, epochs=snap.epochs[:3]), next_attempt=False, attempt=0)).created
    detail = b.get_session("job")
    assert [e.restored for e in detail.epochs] == [True, True, True, False]
    assert epochs_of(b, "job")[:3] == epochs_of(a, "job")[:3]
    # continuing gives what the uninterrupted run recorded
    for step in range(9, 12):
        stats = [pb.ModalityStats(modality="a", score_sum=3.0, fisher=1.0 + step * step), pb.ModalityStats(modality="b", score_sum=1.5, fisher=2.0)]
        b.transport.report(pb.ReportRequest(job_id="job", epoch=3, step=step, count=4, stats=stats))
    next_window = b.end_epoch("job", attempt=0, epoch=3).next_window
    assert epochs_of(b, "job")[:4] == epochs_of(a, "ref")[:4]
    assert list(next_window) == [m.window for m in reference.epochs[4].modalities]
    assert [e.restored for e in b.get_session("job").epochs] == [True, True, True, False, False]


def test_restored_epochs_are_stored_as_such(stores: Stores) -> None:
    """The flag survives a restart; observed epochs keep the stored layout they had."""
    from dataclasses import replace

    from regulator_service.model import EpochSummary, SessionConfig
    from regulator_service.policy import CLOSED
    from regulator_service.storage import codec
    config = SessionConfig("j", 0, 1, ("a", "b"), codec.profile_from_dict({"name": "none"}), resume_epoch=2)
    epochs = tuple(EpochSummary.start(e, (CLOSED, CLOSED)).close() for e in range(2))
    restored = (replace(epochs[0], restored=True), epochs[1])
    assert '"restored"' not in codec.epoch_to_json(epochs[0])
    store = stores.open()
    store.create_session(config, 1, (CLOSED, CLOSED), None, restored)
    store.close()
    store = stores.open()
    try:
        loaded = store.load_session(config.key)
    finally:
        store.close()
    assert loaded is not None and [e.restored for e in loaded.closed_epochs] == [True, False]


def bad_snapshots(good: pb.SessionSnapshot) -> Iterator[tuple[str, int, pb.SessionSnapshot, str]]:
    """(what, resume_epoch, snapshot, message) for snapshots that must be refused."""

    def edited(edit: Callable[[pb.SessionSnapshot], None], n: int = 3) -> pb.SessionSnapshot:
        s = pb.SessionSnapshot()
        s.CopyFrom(good)
        del s.epochs[n:]
        edit(s)
        return s

    def nan_trace(s: pb.SessionSnapshot) -> None:
        s.epochs[1].modalities[0].fisher_trace = math.nan

    def one_modality(s: pb.SessionSnapshot) -> None:
        del s.epochs[2].modalities[1]

    def three_modalities(s: pb.SessionSnapshot) -> None:
        s.modalities.append("c")

    def history_zero(s: pb.SessionSnapshot) -> None:
        s.profile.official.history = 0

    def gap(s: pb.SessionSnapshot) -> None:
        s.epochs[2].epoch = 3

    def flipped_window(s: pb.SessionSnapshot) -> None:
        for m in s.epochs[2].modalities:
            m.window.open = not m.window.open

    def other_profile(s: pb.SessionSnapshot) -> None:
        s.profile.official.history = 3

    def negative_trace(s: pb.SessionSnapshot) -> None:
        s.epochs[0].modalities[1].fisher_trace = -1.0

    def infinite_growth(s: pb.SessionSnapshot) -> None:
        s.epochs[0].modalities[0].window.growth = math.inf

    def open_epoch(s: pb.SessionSnapshot) -> None:
        s.epochs[2].closed = False

    def too_many_regulated(s: pb.SessionSnapshot) -> None:
        s.epochs[1].modalities[0].regulated_steps = s.epochs[1].steps + 1

    def overflowing_sum(s: pb.SessionSnapshot) -> None:
        s.epochs[1].modalities[0].mean_proximal = 1.7e308  # x 3 steps: beyond float64

    yield "NaN trace", 3, edited(nan_trace), "fisher_trace of 'a' in snapshot epoch 1 must be finite"
    yield "overflowing sum", 3, edited(overflowing_sum), "mean_proximal x steps"
    yield "negative trace", 3, edited(negative_trace), "must be >= 0"
    yield "wrong modality count", 3, edited(one_modality), "snapshot epoch 2 has modalities"
    yield "extra modality", 3, edited(three_modalities), "snapshot's modalities"
    yield "too many epochs", 2, edited(lambda s: None), "holds 3 epoch"
    yield "too few epochs", 4, edited(lambda s: None), "holds 3 epoch"
    yield "beyond the limit", 10_001, edited(lambda s: None), "at most 10000 epochs"
    yield "no resume epoch", 0, edited(lambda s: None), "resume_epoch > 0"
    yield "out-of-range profile param", 3, edited(history_zero), "history"
    yield "another profile", 3, edited(other_profile), "differs from the session's"
    yield "epoch gap", 3, edited(gap), "numbered 3"
    yield "altered window", 3, edited(flipped_window), "not what profile 'official' decides"
    yield "infinite growth", 3, edited(infinite_growth), "finite or NaN"
    yield "open epoch", 3, edited(open_epoch), "not closed"
    yield "regulated steps", 3, edited(too_many_regulated), "regulated_steps"


def test_a_bad_snapshot_is_invalid_argument_and_nothing_is_stored(connect: Callable[[str], RegulatorClient]) -> None:
    good = recorded_snapshot(connect("a"), "job", epochs=4)
    b = connect("b")
    for what, resume_epoch, snap, message in bad_snapshots(good):
        with pytest.raises(InvalidArgument, match=message):
            b.transport.open_session(open_req("job", resume_epoch=resume_epoch, snapshot=snap))
        assert b.list_sessions(include_inactive=True) == [], what
        with pytest.raises(NotFound):
            b.get_session("job")
    # the good one, for contrast
    ok = pb.SessionSnapshot()
    ok.CopyFrom(good)
    del ok.epochs[3:]
    assert b.transport.open_session(open_req("job", resume_epoch=3, snapshot=ok)).created


def test_a_snapshot_never_overwrites_the_history_a_regulator_holds(connect: Callable[[str], RegulatorClient]) -> None:
    a = connect("a")
    mine = recorded_snapshot(a, "job", epochs=4)
    others = recorded_snapshot(a, "other", epochs=4, scale=3.0)  # another run, valid in itself
    before = epochs_of(a, "job")
    del mine.epochs[3:], others.epochs[3:]
    with pytest.raises(FailedPrecondition, match="belongs to another run"):
        a.transport.open_session(open_req("job", resume_epoch=3, snapshot=others))
    assert epochs_of(a, "job") == before and [s.attempt for s in a.list_sessions(include_inactive=True) if s.job_id == "job"] == [0]
    # the job's own snapshot: it resumes from the regulator's own history, nothing marked restored
    resumed = a.transport.open_session(open_req("job", resume_epoch=3, snapshot=mine))
    assert resumed.session.attempt == 1
    assert [e.restored for e in a.get_session("job").epochs] == [False] * 4
    assert epochs_of(a, "job")[:3] == before[:3] and epochs_of(a, "job", 0) == before


def test_the_hook_checkpoint_resumes_on_an_empty_regulator(connect: Callable[[str], RegulatorClient]) -> None:
    """The plain-loop harness of test_hook_checkpoint: crash in epoch 2, then resume from the
    checkpoint on another regulator that never saw the job. The hook's state goes through JSON
    too (a Hugging Face trainer state) and torch.save with weights_only loading."""
    a = connect("a")
    run(a, "full", range(EPOCHS))
    ckpt = run(a, "job", range(3), crash_after=2)
    hook_state = json.loads(json.dumps(ckpt["hook"]))
    buf = io.BytesIO()
    torch.save(hook_state, buf)
    buf.seek(0)
    ckpt["hook"] = torch.load(buf, weights_only=True)
    b = connect("b")
    run(b, "job", range(2, EPOCHS), resume=ckpt)
    assert steps_of(b, "job") == steps_of(a, "full")[2 * STEPS_PER_EPOCH :]
    assert epochs_of(b, "job") == epochs_of(a, "full")
    assert [e.restored for e in b.get_session("job").epochs] == [True, True, False, False, False]  # and the next, never opened


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning", "ignore:.*LeafSpec.*:FutureWarning",
                            "ignore:Be aware that when using `ckpt_path`")
def test_a_lightning_checkpoint_resumes_on_an_empty_regulator(tmp_path: Path) -> None:
    """A Lightning fit (official, history=2; 5 batches an epoch) crashes 3 steps into epoch 3 and
    resumes from the epoch-2 checkpoint (``ckpt_path``) on a regulator that never saw the job (a new in-process
    one): the callback's state holds the snapshot, and every step equals the uninterrupted fit's."""
    from .test_lightning import Crash, steps_of as lightning_steps  # skips without lightning

    from lightning.pytorch.callbacks import ModelCheckpoint
    from regulator_client.lightning import InfoRegCallback, pl
    from trainers import lightning_digits
    from trainers.digits import TrainConfig
    from trainers.digits_data import load_split

    data = load_split(("fac", "zer"))
    cfg = TrainConfig(profile="official", epochs=4, threads=1)
    train_set = torch.utils.data.TensorDataset(*(torch.from_numpy(data.x_train[v]) for v in cfg.views), torch.from_numpy(data.y_train))
    quiet = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, accelerator="cpu", devices=1,
                 max_epochs=4, limit_train_batches=5)

    def fit(client: RegulatorClient, *callbacks: Any, ckpt: Path | None = None, **kw: Any) -> None:
        cb = InfoRegCallback(client, lambda m: m.model.encoders, job_id="job", profile="official", profile_params={"history": 2})
        pl.Trainer(callbacks=[cb, *callbacks], **quiet, **kw).fit(lightning_digits.DigitsModule(cfg, data.dims, train_set), ckpt_path=ckpt)

    # three regulators of their own (in-process: the server's code, in memory)
    reference, first, second = RegulatorClient.in_process(), RegulatorClient.in_process(), RegulatorClient.in_process()
    fit(reference, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(first, Crash(epoch=3, batch=3), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
    with pytest.raises(FailedPrecondition, match="no previous attempt"):  # without the snapshot: the measured failure
        second.transport.open_session(pb.OpenSessionRequest(job_id="job", modalities=["fac", "zer"], resume_epoch=3,
                                                            profile=pb.Profile(official=pb.OfficialProfile(history=2))))
    fit(second, enable_checkpointing=False, ckpt=tmp_path / "ckpt" / "last.ckpt")
    full = lightning_steps(reference, "job")
    assert lightning_steps(second, "job") == full[3 * 5 :]
    assert [e.restored for e in second.get_session("job").epochs] == [True] * 3 + [False] * 2
    assert epochs_of(second, "job") == epochs_of(reference, "job")
    assert not any(m.window.open for e in reference.get_session("job").epochs[3:] for m in e.modalities)


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("framework", ["hugging-face", "accelerate"])
def test_hf_and_accelerate_checkpoints_resume_on_an_empty_regulator(tmp_path: Path, framework: str) -> None:
    """The resume tests of test_integration_resume.py (official, history=2, crash in epoch 3,
    resume from the end of epoch 2), with the crashed run on one regulator and the resumed one on
    another that never saw the job: ``trainer.train(resume_from_checkpoint=...)`` (the hook's
    state in the JSON trainer state) and ``accelerator.load_state`` (``register_for_checkpointing``)."""
    from .test_integration_resume import (
        CRASH_STEP, RESUME_STEP, accelerate_run, assert_same_weights, assert_windows_close_before_the_resume, hf_trainer,
    )
    from .test_hook_checkpoint import epochs_of as plain_epochs

    lost, fresh = RegulatorClient.in_process(), RegulatorClient.in_process()
    if framework == "hugging-face":
        full = hf_trainer(tmp_path, fresh, "full", save="no")
        full.train()
        with pytest.raises(RuntimeError, match="simulated crash"):
            hf_trainer(tmp_path, lost, "job", save="epoch", crash_at=CRASH_STEP).train()
        resumed = hf_trainer(tmp_path, fresh, "job", save="epoch")
        resumed.train(resume_from_checkpoint=str(tmp_path / "job" / f"checkpoint-{RESUME_STEP}"))
        models = (resumed.model, full.model)
    else:
        _, full_model = accelerate_run(tmp_path, fresh, "full")
        with pytest.raises(RuntimeError, match="simulated crash"):
            accelerate_run(tmp_path, lost, "job", crash_at=CRASH_STEP)
        _, resumed_model = accelerate_run(tmp_path, fresh, "job", resume=tmp_path / "job" / "epoch-2")
        models = (resumed_model, full_model)
    assert_windows_close_before_the_resume(fresh, "full")
    assert steps_of(fresh, "job") == steps_of(fresh, "full")[RESUME_STEP:]
    assert plain_epochs(fresh, "job") == plain_epochs(fresh, "full")
    assert [e.restored for e in fresh.get_session("job").epochs if e.closed] == [True] * 3 + [False] * 2
    assert_same_weights(*models)


# -- the whole pod killed: trainer and regulator together -----------------------------------------

SCRIPT = ROOT / "tests" / "scripts" / "pod_killed.py"
EPOCHS_E2E = 6
STEPS = 25  # digits: 1600 training samples, batch 64
KILL_AT = 4 * STEPS + 7  # in epoch 4: the checkpoint of epoch 4 is the last one
PROFILE = ["--profile", "official", "--profile-param", "history=2"]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("REGULATOR_", "TORCHELASTIC_"))}
    out["PYTHONPATH"] = str(ROOT)
    return out


def run_proc(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def assert_windows_closed_before_resume(detail: pb.GetSessionResponse, resume: int) -> None:
    """The test can fail: regulation was on early (windows open, coefficients applied) and the
    windows closed before the resume point, so a regulator that restarted the history (open
    windows again) would apply other coefficients."""
    opened = [e.epoch for e in detail.epochs if e.closed and e.modalities[0].window.open]
    assert opened and max(opened) < resume - 1, opened
    assert any(m.regulated_steps for e in detail.epochs for m in e.modalities)
    assert not any(m.window.open for e in detail.epochs[resume - 1 :] for m in e.modalities)


def recorded(detail: pb.GetSessionResponse) -> list[tuple]:
    """Every epoch's traces, windows and regulated steps (restored or not)."""
    return [(e.epoch, [(m.fisher_trace, m.window.open, repr(m.window.growth), m.regulated_steps) for m in e.modalities])
            for e in detail.epochs]


@pytest.mark.e2e
def test_digits_pod_killed_with_its_regulator_resumes_on_an_empty_one(tmp_path: Path) -> None:
    """`python -m trainers.digits --checkpoint`: trainer and regulator killed together in epoch 4
    (history=2: windows open for epochs 0-2 only), then the same command against a new regulator
    on an empty state directory. The final weights and every applied coefficient are those of an
    uninterrupted run."""
    from trainers.digits import TrainConfig, train
    from trainers.serverproc import ServerProcess

    common = [*PROFILE, "--epochs", str(EPOCHS_E2E), "--seed", "0", "--job-id", "pod"]
    ckpt = str(tmp_path / "ckpt.pt")
    with ServerProcess(str(tmp_path / "state-a")) as first:
        assert first.proc is not None
        killed = run_proc([sys.executable, str(SCRIPT), str(KILL_AT), str(first.proc.pid), "--", "digits",
                           "--target", first.target, *common, "--checkpoint", ckpt])
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert first.proc.wait(30) == -signal.SIGKILL
    with ServerProcess(str(tmp_path / "state-b")) as second, RegulatorClient.connect(second.target, timeout=30) as client:
        assert client.list_sessions(include_inactive=True) == []  # an empty regulator
        resumed = run_proc([sys.executable, "-m", "trainers.digits", "--target", second.target, *common,
                            "--checkpoint", ckpt, "--out", str(tmp_path / "resumed.json")])
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming job pod at epoch 4 (step 100)" in resumed.stderr
        # the uninterrupted run, trained here (as tests/test_retried_pod.py does: the same bits)
        want = train(TrainConfig(profile="official", profile_params={"history": 2}, epochs=EPOCHS_E2E, seed=0, job_id="full"), client)
        pod, ref = client.get_session("pod"), client.get_session("full")
    got = json.loads((tmp_path / "resumed.json").read_text())
    assert_windows_closed_before_resume(ref, 4)
    assert got["weights_digest"] == want["weights_digest"]
    assert got["applied"] == want["applied"][4 * STEPS :]
    assert [e.restored for e in pod.epochs] == [True] * 4 + [False] * 3  # 4-5 recorded here, 6 never opened
    assert recorded(pod) == recorded(ref)


@pytest.mark.e2e
def test_ddp_pod_killed_with_its_regulator_resumes_on_an_empty_one(tmp_path: Path) -> None:
    """The same with 2 DDP ranks (trainers.digits_ddp under torchrun): the agent, both ranks and
    the regulator killed together; the retried pod's ranks load rank 0's checkpoint and the
    restored session gives every rank the coefficients of an uninterrupted 2-rank run."""
    from trainers.serverproc import ServerProcess

    common = [*PROFILE, "--epochs", str(EPOCHS_E2E), "--seed", "0"]
    ckpt = str(tmp_path / "ckpt.pt")
    with ServerProcess(str(tmp_path / "state-a")) as first:
        assert first.proc is not None
        killed = run_proc(torchrun(str(SCRIPT), str(KILL_AT), str(first.proc.pid), "--", "digits_ddp", "--target", first.target,
                                   *common, "--job-id", "ddp-pod", "--checkpoint", ckpt))
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        assert first.proc.wait(30) == -signal.SIGKILL
    with ServerProcess(str(tmp_path / "state-b")) as second, RegulatorClient.connect(second.target, timeout=30) as client:
        assert client.list_sessions(include_inactive=True) == []
        resumed = run_proc(torchrun("-m", "trainers.digits_ddp", "--target", second.target, *common, "--job-id", "ddp-pod",
                                    "--checkpoint", ckpt, "--out", str(tmp_path / "resumed.json"), "--coef-log", str(tmp_path / "coefs")))
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "resuming job ddp-pod at epoch 4 (step 100)" in resumed.stdout
        full = run_proc(torchrun("-m", "trainers.digits_ddp", "--target", second.target, *common, "--job-id", "ddp-full",
                                 "--out", str(tmp_path / "full.json")))
        assert full.returncode == 0, full.stdout + full.stderr
        pod, ref = client.get_session("ddp-pod"), client.get_session("ddp-full")
    got, want = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("resumed", "full"))
    assert_windows_closed_before_resume(ref, 4)
    assert len(set(got["weights_digest_per_rank"])) == 1
    assert got["weights_digest_per_rank"] == want["weights_digest_per_rank"]
    assert got["applied"] == want["applied"][4 * STEPS :]
    ranks = [read_jsonl(tmp_path / "coefs" / f"rank{r}.jsonl") for r in range(2)]
    assert [[e["proximal"] for e in r] for r in ranks] == [[dict(zip(("fac", "zer"), a)) for a in want["applied"][4 * STEPS :]]] * 2
    assert [e.restored for e in pod.epochs] == [True] * 4 + [False] * 3  # 4-5 recorded here, 6 never opened
    assert recorded(pod) == recorded(ref)
