"""The hook in Hugging Face ``transformers.Trainer`` and in an Accelerate loop, through a real
regulator on loopback: a tiny randomly initialised two-view model (no downloads). With the same
initial weights, data order and optimiser, both report exactly the steps of the plain hook loop;
with gradient accumulation, one report per optimizer step covering every micro-batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, SequentialSampler

from regulator_client import RegulatorClient
from regulator_client.heads import concat_unimodal_logits
from regulator_client.hook import InfoRegHook
from regulator_client.microbatch import MicroBatchScores

N, BATCH, CLASSES = 96, 16, 4


class TwoViews(nn.Module):
    """Two MLP encoders, concat head; forward returns loss, logits and unimodal logits."""

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"a": nn.Sequential(nn.Linear(8, 16), nn.ReLU()), "b": nn.Sequential(nn.Linear(8, 16), nn.ReLU())})
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x_a: Tensor, x_b: Tensor, labels: Optional[Tensor] = None) -> dict[str, Any]:
        fa, fb = self.encoders["a"](x_a), self.encoders["b"](x_b)
        fused = self.head(torch.cat([fa, fb], 1))
        uni = concat_unimodal_logits(self.head, {"a": fa, "b": fb})
        out: dict[str, Any] = {"logits": fused, "unimodal_logits": uni}
        if labels is not None:
            out["loss"] = F.cross_entropy(fused, labels)
        return out


class Views(Dataset):
    """View a is informative, view b barely."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.y = torch.randint(0, CLASSES, (N,), generator=g)
        centres = torch.randn(CLASSES, 8, generator=g)
        self.a = centres[self.y] + 0.3 * torch.randn(N, 8, generator=g)
        self.b = 0.2 * centres[self.y] + torch.randn(N, 8, generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x_a": self.a[i], "x_b": self.b[i], "labels": self.y[i]}


def model_and_optimizer() -> tuple[TwoViews, torch.optim.SGD]:
    torch.manual_seed(0)
    model = TwoViews()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def steps_of(client: RegulatorClient, job: str) -> list[tuple]:
    return [
        (s.epoch, s.step, s.count, tuple((m.modality, m.score_sum, m.fisher, m.factors.proximal) for m in s.modalities))
        for s in client.get_session(job, include_steps=True).steps
    ]


def plain_loop(client: RegulatorClient, job: str, epochs: int = 2) -> None:
    """The reference: the hook in a plain loop, sequential batches."""
    model, opt = model_and_optimizer()
    data = Views()
    hook = InfoRegHook(client, dict(model.encoders), job_id=job, profile="official", rank=0, world_size=1)
    with hook:
        for epoch in range(epochs):
            hook.on_epoch_start(epoch)
            for batch in batches(data):
                opt.zero_grad(set_to_none=True)
                out = model(**batch)
                out["loss"].backward()
                hook.after_backward(logits=out["unimodal_logits"], labels=batch["labels"])
                opt.step()
            hook.on_epoch_end()


# -- Hugging Face transformers ---------------------------------------------------------------------


def batches(data: Views) -> list[dict[str, torch.Tensor]]:
    """The plain loop's batches, in order."""
    return [{k: torch.stack([data[i][k] for i in range(s, s + BATCH)]) for k in ("x_a", "x_b", "labels")} for s in range(0, N, BATCH)]


def in_order_trainer() -> type:
    """``InfoRegTrainer`` taking the examples in the plain loop's order (no shuffling)."""
    from regulator_client.hf_trainer import InfoRegTrainer

    class InOrder(InfoRegTrainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)

    return InOrder


def hf_trainer(tmp_path: Path, client: RegulatorClient, job: str, accumulate: int = 1) -> Any:
    transformers = pytest.importorskip("transformers")
    InOrder = in_order_trainer()
    model, opt = model_and_optimizer()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / job), per_device_train_batch_size=BATCH // accumulate, gradient_accumulation_steps=accumulate,
        num_train_epochs=2, max_grad_norm=0.0, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=0,
    )
    const = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return InOrder(
        model=model, args=args, train_dataset=Views(), optimizers=(opt, const),
        regulator=client, encoders=lambda m: dict(m.encoders), job_id=job, profile="official",
        hook_options={"keep_history": True},
    )


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_hf_trainer_reports_the_plain_loops_steps(server, tmp_path: Path) -> None:
    with RegulatorClient.connect(server.target, timeout=10.0) as client:
        trainer = hf_trainer(tmp_path, client, "hf")
        trainer.train()
        plain_loop(client, "plain")
        hf, plain = steps_of(client, "hf"), steps_of(client, "plain")
        assert len(hf) == 2 * N // BATCH and [s[1] for s in hf] == list(range(12))
        assert hf == plain
        assert any(beta > 0 for s in hf for (_, _, _, beta) in s[3])  # official regulates from epoch 0
        assert [e.closed for e in client.get_session("hf").epochs] == [True, True, False]
        assert client.get_session("hf").session.state != 0


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_hf_trainer_with_gradient_accumulation_reports_once_per_optimizer_step(server, tmp_path: Path) -> None:
    with RegulatorClient.connect(server.target, timeout=10.0) as client:
        trainer = hf_trainer(tmp_path, client, "hf-accum", accumulate=2)
        trainer.train()
        steps = steps_of(client, "hf-accum")
    assert [s[2] for s in steps] == [BATCH] * 12  # two micro-batches of 8 per report
    assert [r.step for r in trainer.inforeg_hook.history] == list(range(12))


def test_hf_trainer_without_unimodal_logits_fails_clearly(tmp_path: Path) -> None:
    pytest.importorskip("transformers")

    class FusedOnly(TwoViews):
        def forward(self, x_a: Tensor, x_b: Tensor, labels: Optional[Tensor] = None) -> dict[str, Any]:
            out = super().forward(x_a, x_b, labels)
            del out["unimodal_logits"]
            return out

    client = RegulatorClient.in_process()
    trainer = hf_trainer(tmp_path, client, "hf-bad")
    torch.manual_seed(0)
    trainer.model = FusedOnly()
    trainer.model_wrapped = trainer.model
    with pytest.raises(RuntimeError, match="no 'unimodal_logits'"):
        trainer.train()


# -- Accelerate ----------------------------------------------------------------------------------


def accelerate_loop(client: RegulatorClient, job: str, accumulate: int = 1) -> list[int]:
    """The documented recipe: accelerator.backward(loss), collect scores, report on sync steps."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model, opt = model_and_optimizer()
    loader = torch.utils.data.DataLoader(Views(), batch_size=BATCH // accumulate, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    hook = InfoRegHook(client, dict(accelerator.unwrap_model(model).encoders), job_id=job, profile="official", keep_history=True)
    scores = MicroBatchScores(hook)
    with hook:
        for epoch in range(2):
            hook.on_epoch_start(epoch)
            for batch in loader:
                with accelerator.accumulate(model):
                    out = model(**batch)
                    accelerator.backward(out["loss"])
                    scores.add(out["unimodal_logits"], batch["labels"])
                    if accelerator.sync_gradients:
                        scores.report()
                    opt.step()
                    opt.zero_grad()
            hook.on_epoch_end()
    return [r.step for r in hook.history]


def test_accelerate_recipe_reports_the_plain_loops_steps(server) -> None:
    with RegulatorClient.connect(server.target, timeout=10.0) as client:
        assert accelerate_loop(client, "acc") == list(range(12))
        plain_loop(client, "plain")
        assert steps_of(client, "acc") == steps_of(client, "plain")


def test_accelerate_recipe_with_gradient_accumulation(server) -> None:
    with RegulatorClient.connect(server.target, timeout=10.0) as client:
        assert accelerate_loop(client, "acc2", accumulate=2) == list(range(12))
        assert [s[2] for s in steps_of(client, "acc2")] == [BATCH] * 12
