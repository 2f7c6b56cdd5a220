"""The regulation in each integration's own training log, read back from real TensorBoard event
files: the plain hook through ``SummaryWriter``, the Hugging Face Trainer (``report_to``,
``log_history``), Accelerate (``accelerator.log``) and Lightning (its ``TensorBoardLogger``).
Every one logs the same keys, and their values are the regulator's own record of the run (real
regulator on loopback). The official profile with ``history=2`` closes the windows after epoch 2,
so the logged windows change during the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from regulator_client import RegulatorClient
from regulator_client.hook import InfoRegHook

from .test_frameworks import BATCH, N, Views, batches, in_order_trainer, model_and_optimizer

EPOCHS = 4
STEPS = N // BATCH  # per epoch
PROFILE = dict(profile="official", profile_params={"history": 2})
PER_MODALITY = ("proximal", "window_open", "fisher_trace", "mean_proximal", "max_proximal", "regulated_steps",
                "mean_score", "growth", "next_window_open")
KEYS = {
    "inforeg/epoch", "inforeg/fallback", "inforeg/closed_epoch", "inforeg/fallbacks/epoch_steps", "inforeg/fallbacks/steps",
    "inforeg/fallbacks/deferred_epoch_ends", "inforeg/fallbacks/waits",
} | {f"inforeg/{m}/{k}" for m in ("a", "b") for k in PER_MODALITY}


def f32(x: float) -> float:
    """What a TensorBoard scalar holds of a value (event files store float32)."""
    return torch.tensor(x, dtype=torch.float32).item()


def event_scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the single TensorBoard event file under ``root``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(root.rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def regulator_epochs(client: RegulatorClient, job: str) -> list[Any]:
    epochs = [e for e in client.get_session(job).epochs if e.closed]
    assert len(epochs) == EPOCHS
    return epochs


def assert_epoch_values(logged: dict[str, list[tuple[int, float]]], client: RegulatorClient, job: str, prefix: str = "") -> None:
    """The last value logged for each epoch (at its last step) is the regulator's record of it,
    and the windows close during the run (so a log that stopped changing would show)."""
    epochs = regulator_epochs(client, job)
    for e in epochs:
        at = {tag: dict(points).get((e.epoch + 1) * STEPS) for tag, points in logged.items()}
        assert at[f"{prefix}inforeg/closed_epoch"] == e.epoch
        for m in e.modalities:
            key = f"{prefix}inforeg/{m.modality}"
            assert at[f"{key}/fisher_trace"] == f32(m.fisher_trace)
            assert at[f"{key}/window_open"] == float(m.window.open)
            assert at[f"{key}/mean_proximal"] == f32(m.mean_proximal)
            assert at[f"{key}/regulated_steps"] == m.regulated_steps
    assert [e.modalities[0].window.open for e in epochs] == [True, True, True, False]


def test_plain_hook_metrics_through_a_summary_writer(server, tmp_path: Path) -> None:
    """The documented recipe: ``hook.metrics()`` to ``SummaryWriter.add_scalar`` every step."""
    from torch.utils.tensorboard import SummaryWriter

    model, opt = model_and_optimizer()
    data = Views()
    writer = SummaryWriter(str(tmp_path / "runs"))
    with RegulatorClient.connect(server.target, timeout=30.0) as client:
        hook = InfoRegHook(client, dict(model.encoders), job_id="plain", rank=0, world_size=1, keep_history=True, **PROFILE)
        assert hook.metrics() == {"inforeg/fallbacks/steps": 0.0, "inforeg/fallbacks/deferred_epoch_ends": 0.0, "inforeg/fallbacks/waits": 0.0}
        step = 0
        with hook:
            for epoch in range(EPOCHS):
                hook.on_epoch_start(epoch)
                for i, batch in enumerate(batches(data)):
                    opt.zero_grad(set_to_none=True)
                    out = model(**batch)
                    out["loss"].backward()
                    hook.after_backward(logits=out["unimodal_logits"], labels=batch["labels"])
                    opt.step()
                    step += 1
                    if i + 1 < STEPS:  # mid-epoch: the step's values (cheap: no host sync)
                        for key, value in hook.metrics().items():
                            writer.add_scalar(key, value, step)
                hook.on_epoch_end()
                for key, value in hook.metrics().items():  # the epoch's end: its record too
                    writer.add_scalar(key, value, step)
        writer.close()
        logged = event_scalars(tmp_path / "runs")
        assert set(logged) == KEYS
        assert_epoch_values(logged, client, "plain")
        steps = client.get_session("plain", include_steps=True).steps
    proximal = dict(logged["inforeg/a/proximal"])
    assert [proximal[s.step + 1] for s in steps] == [f32(s.modalities[0].factors.proximal) for s in steps]
    assert [r.proximal["a"] for r in hook.history] == [s.modalities[0].factors.proximal for s in steps]
    assert sum(v > 0 for v in proximal.values()) == 3 * STEPS  # regulated while the windows were open
    assert dict(logged["inforeg/epoch"])[STEPS + 1] == 1.0  # a step of epoch 1


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("logging", ["epoch", "steps"])
def test_hf_trainer_logs_the_regulation_to_log_history_and_tensorboard(server, tmp_path: Path, logging: str) -> None:
    """``report_to="tensorboard"``: the keys are in ``state.log_history`` (so every backend gets
    them) and in the event file, one entry per epoch at least; with a log every step, the step's
    coefficients too."""
    transformers = pytest.importorskip("transformers")
    InOrder = in_order_trainer()
    model, opt = model_and_optimizer()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, max_grad_norm=0.0,
        use_cpu=True, report_to=["tensorboard"], save_strategy="no", logging_strategy=logging, logging_steps=1,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=0,
    )
    with RegulatorClient.connect(server.target, timeout=30.0) as client:
        trainer = InOrder(
            model=model, args=args, train_dataset=Views(), optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)),
            regulator=client, encoders=lambda m: dict(m.encoders), job_id=f"hf-{logging}", **PROFILE,
        )
        trainer.train()
        logged = event_scalars(tmp_path / "out")
        assert {t for t in logged if "inforeg/" in t} == {f"train/{k}" for k in KEYS}
        assert_epoch_values(logged, client, f"hf-{logging}", prefix="train/")
        history = [h for h in trainer.state.log_history if "inforeg/epoch" in h]
        closing = [h for h in history if h.get("inforeg/closed_epoch") == h["inforeg/epoch"]]
        records = regulator_epochs(client, f"hf-{logging}")
        assert [h["step"] for h in closing] == [(e + 1) * STEPS for e in range(EPOCHS)]
        assert [h["inforeg/a/fisher_trace"] for h in closing] == [e.modalities[0].fisher_trace for e in records]  # float64
        steps = client.get_session(f"hf-{logging}", include_steps=True).steps
    per_step = {h["step"]: h["inforeg/a/proximal"] for h in history}
    if logging == "steps":
        assert [per_step[s.step + 1] for s in steps] == [s.modalities[0].factors.proximal for s in steps]
    else:
        assert sorted(per_step) == [(e + 1) * STEPS for e in range(EPOCHS)]


def test_accelerate_logs_the_regulation_through_accelerator_log(server, tmp_path: Path) -> None:
    """The recipe: ``accelerator.log(hook.metrics(), step=...)`` with ``log_with="tensorboard"``."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    from regulator_client.microbatch import MicroBatchScores

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    model, opt = model_and_optimizer()
    loader = DataLoader(Views(), batch_size=BATCH, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    with RegulatorClient.connect(server.target, timeout=30.0) as client:
        hook = InfoRegHook(client, dict(accelerator.unwrap_model(model).encoders), job_id="acc-log", **PROFILE)
        scores = MicroBatchScores(hook)
        step = 0
        with hook:
            for epoch in range(EPOCHS):
                hook.on_epoch_start(epoch)
                for batch in loader:
                    with accelerator.accumulate(model):
                        out = model(**batch)
                        accelerator.backward(out["loss"])
                        scores.add(out["unimodal_logits"], batch["labels"])
                        if accelerator.sync_gradients:
                            scores.report()
                            step += 1
                        opt.step()
                        opt.zero_grad()
                hook.on_epoch_end()
                accelerator.log(hook.metrics(), step=step)
        accelerator.end_training()
        logged = event_scalars(tmp_path / "run")
        assert set(logged) == KEYS
        assert_epoch_values(logged, client, "acc-log")


def test_lightning_logs_the_same_keys(server, tmp_path: Path) -> None:
    """``InfoRegCallback`` logs ``hook.metrics()`` at each epoch end to the trainer's loggers."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger

    from regulator_client.lightning import InfoRegCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, _ = model_and_optimizer()

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            out = self.model(**batch)
            self.inforeg_logits, self.inforeg_labels = out["unimodal_logits"], batch["labels"]
            return out["loss"]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(Views(), batch_size=BATCH, shuffle=False)

    with RegulatorClient.connect(server.target, timeout=30.0) as client:
        cb = InfoRegCallback(client, lambda m: dict(m.model.encoders), job_id="pl-log", **PROFILE)
        trainer = pl.Trainer(
            max_epochs=EPOCHS, accelerator="cpu", devices=1, callbacks=[cb], logger=TensorBoardLogger(str(tmp_path), name="pl"),
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        trainer.fit(Module())
        logged = event_scalars(tmp_path / "pl")
        assert {t for t in logged if t.startswith("inforeg/")} == KEYS
        # Lightning writes epoch-level values at the epoch's last global step (counted from 0)
        shifted = {t: [(s + 1, v) for s, v in points] for t, points in logged.items()}
        assert_epoch_values(shifted, client, "pl-log")


def test_metric_keys_of_a_fallback_step_a_scaling_profile_and_an_undefined_statistic() -> None:
    """A step without the regulator's answer has no window (unknown) and ``fallback`` 1; a
    profile that scales gradients adds their keys; an undefined window statistic is left out."""
    from inforeg.regulator.v1 import regulator_pb2 as pb
    from regulator_client.delivery import DeliveryStats
    from regulator_client.hook import _Answer
    from regulator_client.training_metrics import flat_metrics

    end = pb.EndEpochResponse(
        closed=pb.EpochRecord(epoch=0, closed=True, steps=6, fallback_steps=2, modalities=[
            pb.ModalityEpoch(modality="a", fisher_trace=2.5, window=pb.ModalityWindow(modality="a", open=True, growth=float("nan"))),
            pb.ModalityEpoch(modality="b", fisher_trace=0.5, window=pb.ModalityWindow(modality="b", open=False, growth=0.25)),
        ]),
        next_epoch=1, next_window=[pb.ModalityWindow(modality="a", open=False), pb.ModalityWindow(modality="b", open=True)],
    )
    out = flat_metrics(("a", "b"), epoch=1, last_step=_Answer.neutral(2), last_epoch_end=end,
                       delivery=DeliveryStats(fallback_steps=2), scaled=True)
    assert out["inforeg/fallback"] == 1.0 and out["inforeg/fallbacks/steps"] == 2.0 and out["inforeg/fallbacks/epoch_steps"] == 2.0
    assert "inforeg/a/window_open" not in out and "inforeg/a/growth" not in out and out["inforeg/b/growth"] == 0.25
    assert (out["inforeg/a/grad_scale"], out["inforeg/a/noise_scale"]) == (1.0, 0.0)
    assert (out["inforeg/a/next_window_open"], out["inforeg/b/next_window_open"]) == (0.0, 1.0)
    answered = _Answer((0.5, 0.0), (1.0, 1.0), (0.0, 0.0), (True, False))
    out = flat_metrics(("a", "b"), epoch=None, last_step=answered, last_epoch_end=None, delivery=DeliveryStats(), scaled=False)
    assert out == {"inforeg/fallback": 0.0, "inforeg/a/proximal": 0.5, "inforeg/a/window_open": 1.0, "inforeg/b/proximal": 0.0,
                   "inforeg/b/window_open": 0.0, "inforeg/fallbacks/steps": 0.0, "inforeg/fallbacks/deferred_epoch_ends": 0.0,
                   "inforeg/fallbacks/waits": 0.0}
