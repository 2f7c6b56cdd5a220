"""``InfoRegCallback`` on a real Lightning ``Trainer``, through a real in-thread regulator."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning.pytorch", reason="the Lightning integration needs `pip install lightning`")
pytest.importorskip("sklearn", reason="the digits data split needs scikit-learn")

import torch  # noqa: E402
from inforeg.regulator.v1 import regulator_pb2 as pb  # noqa: E402
from torch import Tensor  # noqa: E402

from regulator_client import RegulatorClient  # noqa: E402
from regulator_client.lightning import InfoRegCallback, pl  # noqa: E402
from trainers import digits, lightning_digits  # noqa: E402
from trainers.digits import TrainConfig  # noqa: E402
from trainers.digits_data import DigitsSplit, load_split  # noqa: E402

# lightning 2.6 on torch 2.13 warns about its own use of a deprecated torch API
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning", "ignore:.*LeafSpec.*:FutureWarning")

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, logger=False)


@pytest.fixture(scope="module")
def data() -> DigitsSplit:
    try:
        return load_split(("fac", "zer"))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def steps_of(client: RegulatorClient, job: str) -> list[tuple]:
    """Every recorded step as plain values: (epoch, step, count, fallback, per modality (score, fisher, beta))."""
    return [
        (s.epoch, s.step, s.count, s.fallback, tuple((m.modality, m.score_sum, m.fisher, m.factors.proximal) for m in s.modalities))
        for s in client.get_session(job, include_steps=True).steps
    ]


def test_lightning_run_equals_the_plain_hook_loop(server, data: DigitsSplit) -> None:
    """Same seed, data order and optimiser: the regulator records the same steps, bit for bit."""
    with RegulatorClient.connect(server.target, timeout=10.0) as client:
        base = dict(profile="official", epochs=2, threads=1)
        plain = digits.train(TrainConfig(job_id="plain", **base), client, data)
        light = lightning_digits.train(TrainConfig(job_id="light", **base), client, data)
        a, b = steps_of(client, "plain"), steps_of(client, "light")
        assert len(b) == 2 * 25 and [s[1] for s in b] == list(range(50))
        assert a == b
        betas = [beta for s in b for (_, _, _, beta) in s[4]]
        assert sum(x > 0 for x in betas) > 40  # official regulates 'fac' in the first epochs
        assert client.get_session("light").session.state == pb.SESSION_STATE_CLOSED  # closed on fit end
        assert [e.closed for e in client.get_session("light").epochs] == [True, True, False]
    assert light["fused_acc"] == plain["fused_acc"] and light["unimodal_acc"] == plain["unimodal_acc"]
    assert light["fisher_trace"] == plain["fisher_trace"]


class GradProbe(pl.Callback):
    """Records fac's first-layer gradient (and weights) in on_before_optimizer_step."""

    def __init__(self) -> None:
        self.grads: list[Tensor] = []
        self.weights: list[Tensor] = []
        self.anchor: Tensor = torch.empty(0)

    @staticmethod
    def weight(pl_module: pl.LightningModule) -> torch.nn.Parameter:
        return pl_module.model.encoders["fac"][0].weight

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.anchor = self.weight(pl_module).detach().clone()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        w = self.weight(pl_module)
        self.grads.append(w.grad.detach().clone())
        self.weights.append(w.detach().clone())


def test_callback_regulates_once_per_optimizer_step_with_accumulation(server, data: DigitsSplit) -> None:
    """accumulate_grad_batches=2: one report per optimizer step, covering both micro-batches, and
    the gradient the optimizer applies is the plain one plus beta * (w - w_epoch_start)."""
    cfg = TrainConfig(profile="official", epochs=1, threads=1)
    train_set = torch.utils.data.TensorDataset(*(torch.from_numpy(data.x_train[v]) for v in cfg.views), torch.from_numpy(data.y_train))
    module = lightning_digits.DigitsModule(cfg, data.dims, train_set)
    before, after = GradProbe(), GradProbe()
    with RegulatorClient.connect(server.target, timeout=10.0) as client:
        cb = InfoRegCallback(client, module.model.encoders, job_id="accum", profile="official", keep_history=True)
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, accumulate_grad_batches=2, callbacks=[before, cb, after], **QUIET)
        trainer.fit(module)
        steps = steps_of(client, "accum")
    # 1,600 samples in batches of 64: 25 micro-batches, 13 optimizer steps (the last one alone)
    assert [s[2] for s in steps] == [128] * 12 + [64]
    assert [r.step for r in cb.history] == list(range(13))
    assert trainer.callback_metrics["inforeg/fac/window_open"].item() == 1.0
    regulated = 0
    for r, g0, g1, w in zip(cb.history, before.grads, after.grads, before.weights):
        beta = r.proximal["fac"]
        torch.testing.assert_close(g1, g0 + beta * (w - before.anchor), rtol=1e-5, atol=1e-7)
        regulated += beta > 0 and not torch.equal(g0, g1)
    assert regulated >= 10


def test_missing_protocol_attributes_fail_clearly(data: DigitsSplit) -> None:
    class Forgetful(lightning_digits.DigitsModule):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            *xs, y = batch
            fused, _ = self.model(dict(zip(self.model.views, xs)))
            return torch.nn.functional.cross_entropy(fused, y)

    cfg = TrainConfig(profile="official", epochs=1)
    train_set = torch.utils.data.TensorDataset(*(torch.from_numpy(data.x_train[v]) for v in cfg.views), torch.from_numpy(data.y_train))
    module = Forgetful(cfg, data.dims, train_set)
    client = RegulatorClient.in_process()
    cb = InfoRegCallback(client, lambda m: m.model.encoders, job_id="forgetful", profile="official")
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", devices=1, callbacks=[cb], **QUIET)
    with pytest.raises(RuntimeError, match="must set self.inforeg_logits"):
        trainer.fit(module)
    assert client.get_session("forgetful").session.state == pb.SESSION_STATE_CLOSED  # closed by on_exception


def test_example_cli_in_process(capsys) -> None:
    assert lightning_digits.main(["--in-process", "--epochs", "1", "--profile", "official"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("official (lightning): fused ") and "epoch   1/1" in err


class Crash(pl.Callback):
    """Simulates a crash at a given epoch and batch (after the previous epoch's checkpoint)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("simulated crash")


def epochs_of(client: RegulatorClient, job: str) -> list[tuple]:
    """Every epoch record of the job's latest attempt (inherited ones included), as plain values."""
    return [
        (e.epoch, e.closed, e.steps, tuple((m.modality, m.fisher_trace, m.window.open, m.regulated_steps, m.mean_proximal) for m in e.modalities))
        for e in client.get_session(job).epochs
    ]


class WithValidation(lightning_digits.DigitsModule):
    """A validation loop, so that ModelCheckpoint saves after validation, inside the epoch."""

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        *xs, y = batch
        fused, _ = self.model(dict(zip(self.model.views, xs)))
        return torch.nn.functional.cross_entropy(fused, y)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.Subset(self.train_set, range(64)), batch_size=64)


@pytest.mark.parametrize("saved_at", ["train-epoch-end", "after-validation"])
def test_fit_resumed_from_a_checkpoint_continues_the_session_like_an_uninterrupted_fit(server, data: DigitsSplit, tmp_path, saved_at: str) -> None:
    """Fit 4 epochs; crash in epoch 2 (5 steps in), resume from the epoch-1 checkpoint with
    ``ckpt_path``: the resumed attempt starts at epoch 2, step 50, inherits epochs 0-1, and every
    step's statistics and coefficients equal the uninterrupted fit's, bit for bit. Checkpoints
    saved at the train epoch's end, or (a validation loop, ModelCheckpoint's defaults) after
    validation (``save_on_train_epoch_end=False``), before the callback has closed the epoch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module_class = WithValidation if saved_at == "after-validation" else lightning_digits.DigitsModule
    saver_options = {"save_on_train_epoch_end": saved_at == "train-epoch-end"}
    cfg = TrainConfig(profile="official", epochs=4, threads=1)
    train_set = torch.utils.data.TensorDataset(*(torch.from_numpy(data.x_train[v]) for v in cfg.views), torch.from_numpy(data.y_train))
    quiet = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, accelerator="cpu", devices=1, max_epochs=4)

    def callback(client: RegulatorClient, job: str) -> InfoRegCallback:
        return InfoRegCallback(client, lambda m: m.model.encoders, job_id=job, profile="official", keep_history=True)

    with RegulatorClient.connect(server.target, timeout=10.0) as client:
        full = callback(client, "uninterrupted")
        pl.Trainer(callbacks=[full], enable_checkpointing=False, **quiet).fit(module_class(cfg, data.dims, train_set))

        ckpts = tmp_path / "ckpt"
        saver = ModelCheckpoint(dirpath=ckpts, save_last=True, **saver_options)
        first = callback(client, "resumed")
        with pytest.raises(RuntimeError, match="simulated crash"):
            pl.Trainer(callbacks=[first, Crash(epoch=2, batch=5), saver], **quiet).fit(module_class(cfg, data.dims, train_set))
        crashed = steps_of(client, "resumed")  # attempt 0: epochs 0-1 and 5 steps of epoch 2
        assert [s[1] for s in crashed] == list(range(55))
        saved = torch.load(ckpts / "last.ckpt", weights_only=True)
        state = [v for k, v in saved["callbacks"].items() if k.startswith("InfoRegCallback")]
        assert saved["epoch"] == 1 and len(state) == 1  # the checkpoint of the end of epoch 1 holds the callback's state
        assert (state[0]["epoch"], state[0]["step"], state[0]["in_epoch"]) == ((1, 50, True) if saved_at == "after-validation" else (2, 50, False))

        second = callback(client, "resumed")
        pl.Trainer(callbacks=[second, ModelCheckpoint(dirpath=ckpts, save_last=True, **saver_options)], **quiet).fit(
            module_class(cfg, data.dims, train_set), ckpt_path=ckpts / "last.ckpt"
        )
        info = client.get_session("resumed").session
        assert info.attempt == 1 and info.state == pb.SESSION_STATE_CLOSED
        resumed = steps_of(client, "resumed")  # attempt 1: from epoch 2, step 50
        uninterrupted = steps_of(client, "uninterrupted")
        assert [s[1] for s in resumed] == list(range(50, 100))
        assert crashed[:50] == uninterrupted[:50]
        assert resumed == uninterrupted[50:]
        assert epochs_of(client, "resumed") == epochs_of(client, "uninterrupted")
    assert [r.step for r in second.history] == list(range(50, 100))
    assert sum(r.proximal["fac"] > 0 for r in second.history) > 0  # the resumed part is regulated


def test_resuming_with_another_job_id_fails_clearly(data: DigitsSplit, tmp_path) -> None:
    cfg = TrainConfig(profile="official", epochs=1, threads=1)
    train_set = torch.utils.data.TensorDataset(*(torch.from_numpy(data.x_train[v]) for v in cfg.views), torch.from_numpy(data.y_train))
    client = RegulatorClient.in_process()
    quiet = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, accelerator="cpu", devices=1, limit_train_batches=2)
    pl.Trainer(max_epochs=1, default_root_dir=tmp_path, callbacks=[InfoRegCallback(client, lambda m: m.model.encoders, job_id="a", profile="official")], **quiet).fit(
        lightning_digits.DigitsModule(cfg, data.dims, train_set)
    )
    ckpt = next(tmp_path.rglob("*.ckpt"))
    other = InfoRegCallback(client, lambda m: m.model.encoders, job_id="b", profile="official")
    with pytest.raises(ValueError, match="belongs to job 'a'"):
        pl.Trainer(max_epochs=2, default_root_dir=tmp_path, callbacks=[other], **quiet).fit(lightning_digits.DigitsModule(cfg, data.dims, train_set), ckpt_path=ckpt)


@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended.*")
def test_fit_resumed_from_a_mid_epoch_checkpoint_continues_inside_that_epoch(data: DigitsSplit, tmp_path) -> None:
    """every_n_train_steps: a checkpoint 10 steps into epoch 1. The resumed attempt opens at
    epoch 1 (inheriting epoch 0), reports from step 35 on, and closes every epoch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = TrainConfig(profile="official", epochs=3, threads=1)
    train_set = torch.utils.data.TensorDataset(*(torch.from_numpy(data.x_train[v]) for v in cfg.views), torch.from_numpy(data.y_train))
    quiet = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, accelerator="cpu", devices=1, max_epochs=3)
    client = RegulatorClient.in_process()
    ckpts = tmp_path / "ckpt"

    def callback() -> InfoRegCallback:
        return InfoRegCallback(client, lambda m: m.model.encoders, job_id="mid", profile="official", keep_history=True)

    saver = ModelCheckpoint(dirpath=ckpts, filename="{step}", every_n_train_steps=35, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pl.Trainer(callbacks=[callback(), Crash(epoch=1, batch=15), saver], **quiet).fit(lightning_digits.DigitsModule(cfg, data.dims, train_set))
    saved = torch.load(ckpts / "step=35.ckpt", weights_only=True)
    state = [v for k, v in saved["callbacks"].items() if k.startswith("InfoRegCallback")][0]
    assert (state["epoch"], state["step"], state["in_epoch"]) == (1, 35, True)
    second = callback()
    pl.Trainer(callbacks=[second], enable_checkpointing=False, **quiet).fit(
        lightning_digits.DigitsModule(cfg, data.dims, train_set), ckpt_path=ckpts / "step=35.ckpt"
    )
    detail = client.get_session("mid")
    assert detail.session.attempt == 1
    assert [e.epoch for e in detail.epochs if e.closed] == [0, 1, 2]
    assert second.history[0].step == 35 and second.history[0].epoch == 1
    assert [r.epoch for r in second.history][-1] == 2
