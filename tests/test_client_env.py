"""Environment switches a job obeys without code changes (issue 17.4): ``REGULATOR_DISABLED`` and
``REGULATOR_ON_UNAVAILABLE``, read by the hook and so by every integration built on it.

"No connection attempt" is checked on a real listening socket: a gRPC client that tried would
complete a TCP handshake there, which ``accept()`` would return."""

from __future__ import annotations

import logging
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import torch
import torch.nn.functional as F
from inforeg.regulator.v1 import regulator_pb2 as pb
from torch import nn

from regulator_client import RegulatorClient
from regulator_client.delivery import QUIET_S
from regulator_client.environment import ClientEnvironment
from regulator_client.hook import InfoRegHook
from regulator_service.edge.server import RegulatorServer, ServerConfig

from .conftest import roomy_limits

EPOCHS, STEPS = 2, 3


@contextmanager
def listening() -> Iterator[tuple[socket.socket, str]]:
    """A real listening port that nobody serves: connections to it are seen, never answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.setblocking(False)
        yield s, f"127.0.0.1:{s.getsockname()[1]}"


@contextmanager
def dead_port() -> Iterator[tuple[int, str]]:
    """Bound, never listening: refuses connections, and no one else can take the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        yield port, f"127.0.0.1:{port}"


def connections(listener: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(6, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fa, fb = torch.relu(self.a(xa)), torch.relu(self.b(xb))
        uni = {"a": fa @ self.head.weight[:, :8].T, "b": fb @ self.head.weight[:, 8:].T}
        return self.head(torch.cat([fa, fb], 1)), uni


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    y = torch.randint(0, 3, (8,), generator=g)
    return torch.randn(8, 6, generator=g) + y[:, None], torch.randn(8, 6, generator=g), y


def train(make_hook: Optional[Any] = None, epochs: range = range(EPOCHS)) -> tuple[Net, Optional[InfoRegHook]]:
    """The same tiny job with or without a hook: same initial weights, batches and optimiser."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hook = make_hook(model) if make_hook else None
    for epoch in epochs:
        if hook:
            hook.on_epoch_start(epoch)
        for i in range(STEPS):
            xa, xb, y = batch(epoch * STEPS + i)
            opt.zero_grad()
            fused, uni = model(xa, xb)
            if hook:
                hook.after_forward(logits=uni, labels=y)
            F.cross_entropy(fused, y).backward()
            if hook:
                hook.after_backward()
            opt.step()
        if hook:
            hook.on_epoch_end()
    if hook:
        hook.close()
    return model, hook


def same_weights(x: nn.Module, y: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))


def encoders(model: Net) -> dict[str, nn.Module]:
    return {"a": model.a, "b": model.b}


# -- reading the switches --------------------------------------------------------------------------


def test_bad_values_name_the_variable_and_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"REGULATOR_ON_UNAVAILABLE='sometimes': expected one of wait, neutral, last"):
        ClientEnvironment.read({"REGULATOR_ON_UNAVAILABLE": "sometimes"})
    with pytest.raises(ValueError, match=r"REGULATOR_DISABLED='maybe': expected 1/true/yes/on or 0/false/no/off"):
        ClientEnvironment.read({"REGULATOR_DISABLED": "maybe"})
    assert ClientEnvironment.read({}) == ClientEnvironment(None, False)
    assert ClientEnvironment.read({"REGULATOR_ON_UNAVAILABLE": " Neutral ", "REGULATOR_DISABLED": "0"}) == ClientEnvironment("neutral", False)
    assert ClientEnvironment.read({"REGULATOR_DISABLED": "true"}).disabled
    monkeypatch.setenv("REGULATOR_ON_UNAVAILABLE", "later")  # the hook reads it when it is built
    with pytest.raises(ValueError, match="REGULATOR_ON_UNAVAILABLE='later'"):
        InfoRegHook(RegulatorClient.in_process(), encoders(Net()), job_id="bad")


def test_an_explicit_argument_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    client, enc = RegulatorClient.in_process(), encoders(Net())
    assert InfoRegHook(client, enc, job_id="j").delivery.mode == "wait"  # nothing set
    monkeypatch.setenv("REGULATOR_ON_UNAVAILABLE", "last")
    assert InfoRegHook(client, enc, job_id="j").delivery.mode == "last"
    assert InfoRegHook(client, enc, job_id="j", on_unavailable="wait").delivery.mode == "wait"
    assert InfoRegHook(client, enc, job_id="j", on_unavailable="neutral").delivery.mode == "neutral"


# -- REGULATOR_DISABLED ---------------------------------------------------------------------------


def test_disabled_trains_as_plain_training_without_any_connection(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    plain, _ = train()
    monkeypatch.setenv("REGULATOR_DISABLED", "1")
    caplog.set_level(logging.INFO, logger="regulator_client")
    with listening() as (listener, target):
        client = RegulatorClient.connect(target, timeout=0.5)
        # wait mode against a port that never answers: any contact would block or fail the job
        off, hook = train(lambda m: InfoRegHook(client, encoders(m), job_id="off", on_unavailable="wait",
                                                wait_timeout=1.0, warn_every_s=0.1, keep_history=True))
        assert connections(listener) == 0
    assert client.transport.channels_opened == 0
    assert same_weights(off, plain)  # gradients untouched
    assert hook is not None and hook.session is None and hook.step == EPOCHS * STEPS and hook.epoch == EPOCHS
    assert [(r.proximal, r.window, r.fallback) for r in hook.history] == [({"a": 0.0, "b": 0.0}, {}, False)] * EPOCHS * STEPS
    said = [r.getMessage() for r in caplog.records if r.name.startswith("regulator_client")]
    assert said == ["REGULATOR_DISABLED is set: InfoReg regulation is off for job off (no regulator contacted, gradients untouched)"]


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning", "ignore:.*LeafSpec.*:FutureWarning")
def test_disabled_lightning_callback_never_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lightning.pytorch", reason="the Lightning integration needs `pip install lightning`")
    from regulator_client.lightning import InfoRegCallback, pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = Net()

        def training_step(self, b: Any, i: int) -> torch.Tensor:
            xa, xb, y = b
            fused, self.inforeg_logits = self.model(xa, xb)
            self.inforeg_labels = y
            return F.cross_entropy(fused, y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(callbacks: list) -> Module:
        parts = [batch(i) for i in range(STEPS)]
        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(*(torch.cat([p[k] for p in parts]) for k in range(3))), batch_size=8, shuffle=False
        )
        module = Module()
        pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, callbacks=callbacks, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, logger=False).fit(module, data)
        return module

    plain = fit([])
    monkeypatch.setenv("REGULATOR_DISABLED", "1")
    with listening() as (listener, target):
        client = RegulatorClient.connect(target, timeout=0.5)
        cb = InfoRegCallback(client, lambda m: encoders(m.model), job_id="light-off", wait_timeout=1.0)
        off = fit([cb])
        assert connections(listener) == 0
    assert cb.hook is not None and cb.hook.disabled and cb.hook.step == EPOCHS * STEPS
    assert same_weights(off.model, plain.model)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_disabled_hugging_face_trainer_never_connects(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from .test_frameworks import BATCH, N, Views, hf_trainer, model_and_optimizer

    model, opt = model_and_optimizer()  # the plain loop the Trainer runs (sequential batches, SGD, 2 epochs)
    data = Views()
    for _ in range(2):
        for start in range(0, N, BATCH):
            idx = range(start, start + BATCH)
            opt.zero_grad(set_to_none=True)
            model(data.a[idx.start : idx.stop], data.b[idx.start : idx.stop], data.y[idx.start : idx.stop])["loss"].backward()
            opt.step()
    monkeypatch.setenv("REGULATOR_DISABLED", "1")
    with listening() as (listener, target):
        client = RegulatorClient.connect(target, timeout=0.5)
        trainer = hf_trainer(tmp_path, client, "hf-off")
        trainer.train()
        assert connections(listener) == 0
    assert trainer.inforeg_hook.disabled and trainer.inforeg_hook.step == 2 * N // BATCH
    assert same_weights(trainer.model, model)


def test_disabled_accelerate_recipe_never_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_frameworks import accelerate_loop

    monkeypatch.setenv("REGULATOR_DISABLED", "1")
    with listening() as (listener, target):
        client = RegulatorClient.connect(target, timeout=0.5)
        assert accelerate_loop(client, "acc-off") == list(range(12))
        assert connections(listener) == 0
    assert client.transport.channels_opened == 0


# -- REGULATOR_ON_UNAVAILABLE ---------------------------------------------------------------------


def test_neutral_from_the_environment_trains_on_against_a_dead_target(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    plain, _ = train()
    monkeypatch.setenv("REGULATOR_ON_UNAVAILABLE", "neutral")
    with dead_port() as (_, dead):
        model, hook = train(lambda m: InfoRegHook(RegulatorClient.connect(dead, timeout=0.5), encoders(m), job_id="fail-open",
                                                  call_timeout=0.5, keep_history=True))
    assert hook is not None and hook.delivery.mode == "neutral"
    assert [r.fallback for r in hook.history] == [True] * EPOCHS * STEPS
    assert all(r.proximal == {"a": 0.0, "b": 0.0} for r in hook.history)
    assert same_weights(model, plain)  # zero coefficients: plain training
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"regulator at {dead} did not answer OpenSession" in w and "starts without regulation" in w for w in warned)


@pytest.mark.e2e
def test_a_fallback_job_that_started_first_is_recorded_once_its_regulator_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The regulator comes up after the job started: the session opens late, with the steps so
    far recorded as fallback steps, and regulation runs from there (attempt assigned late)."""
    monkeypatch.setenv("REGULATOR_ON_UNAVAILABLE", "last")
    with dead_port() as (port, target):
        client = RegulatorClient.connect(target, timeout=5.0)
        torch.manual_seed(0)
        model = Net()
        hook = InfoRegHook(client, encoders(model), job_id="late", profile="official", call_timeout=0.5, keep_history=True)
        assert hook.open() is None  # the job starts; no session yet
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def epoch(e: int) -> None:
        hook.on_epoch_start(e)
        for i in range(STEPS):
            xa, xb, y = batch(e * STEPS + i)
            opt.zero_grad()
            fused, uni = model(xa, xb)
            F.cross_entropy(fused, y).backward()
            hook.after_backward(logits=uni, labels=y)
            opt.step()
        hook.on_epoch_end()

    epoch(0)
    srv = RegulatorServer(ServerConfig(port=port, metrics_port=None, state_dir=tmp_path / "state", grace_seconds=1.0, limits=roomy_limits()))
    srv.start()
    try:
        deadline = time.monotonic() + 30  # a liveness bound: the channel reconnects within its backoff
        while True:
            try:
                client.list_sessions()
                break
            except Exception:
                assert time.monotonic() < deadline, "the client never reached the regulator"
                time.sleep(0.1)
        # after the outage the hook pauses before asking again (at most QUIET_S[1] seconds; the
        # steps in it would fall back): let it end, so epoch 1 is regulated on any machine
        time.sleep(QUIET_S[1])
        epoch(1)
        hook.close()
        detail = client.get_session("late", include_steps=True)
    finally:
        client.close()
        srv.stop(grace=0)
    assert [r.fallback for r in hook.history] == [True] * STEPS + [False] * STEPS
    assert detail.session.attempt == hook.identity.attempt == 0
    assert [(s.epoch, s.step, s.fallback) for s in detail.steps] == (
        [(0, i, pb.FALLBACK_LAST) for i in range(STEPS)] + [(1, STEPS + i, pb.FALLBACK_UNSPECIFIED) for i in range(STEPS)]
    )
    assert [e.closed for e in detail.epochs][:2] == [True, True]
    assert detail.session.state == pb.SESSION_STATE_CLOSED
