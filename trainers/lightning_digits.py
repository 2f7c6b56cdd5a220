"""The digits job of ``trainers.digits``, trained by a PyTorch Lightning ``Trainer`` through
``InfoRegCallback``.

    python -m trainers.lightning_digits --target 127.0.0.1:50051 --profile official --epochs 50
    python -m trainers.lightning_digits --in-process --epochs 5

Same data, model, initialisation, optimiser, schedule and data order as ``trainers.digits``
(``DistributedSampler(shuffle=True, seed=seed)`` deals out ``randperm(n, seed + epoch)``), so on
one CPU process both trainers send the regulator the same steps, bit for bit
(``tests/test_lightning.py``). Needs ``pip install lightning``.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from dataclasses import asdict
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from regulator_client import RegulatorClient
from regulator_client.lightning import InfoRegCallback, pl  # pl: the Lightning package the callback uses

from .digits import (
    TrainConfig,
    add_training_flags,
    client_from_args,
    config_from_args,
    evaluate,
    hook_options,
    loss_fn,
    session_summary,
    write_result,
)
from .digits_data import DigitsSplit, load_split
from .digits_model import ConcatFusionNet


class DigitsModule(pl.LightningModule):
    """ConcatFusionNet; ``training_step`` hands the unimodal logits to the callback."""

    def __init__(self, cfg: TrainConfig, dims: dict[str, int], train_set: TensorDataset) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_set = train_set
        torch.manual_seed(cfg.seed)  # the same initial weights as trainers.digits
        self.model = ConcatFusionNet(dims)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        *xs, y = batch
        fused, uni = self.model(dict(zip(self.model.views, xs)))
        self.inforeg_logits, self.inforeg_labels = uni, y  # InfoRegCallback's protocol
        return loss_fn(fused, uni, y, self.cfg.unimodal_loss)

    def configure_optimizers(self) -> dict[str, Any]:
        opt, sched = self.cfg.optimizer(self.parameters())
        return {"optimizer": opt, "lr_scheduler": sched}

    def train_dataloader(self) -> DataLoader:
        # Lightning calls set_epoch on it; under DDP each rank gets its share of the same order.
        sampler = DistributedSampler(
            self.train_set, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=True, seed=self.cfg.seed
        )
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, sampler=sampler)


class EpochLog(pl.Callback):
    """One line per epoch on stderr: the closed epoch's traces and the next epoch's windows."""

    def __init__(self, inforeg: InfoRegCallback, epochs: int) -> None:
        self.inforeg, self.epochs = inforeg, epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        end = self.inforeg.last_epoch_end
        if end is None or trainer.global_rank != 0:
            return
        traces = " ".join(f"{m.modality}:Tr={m.fisher_trace:.3g}" for m in end.closed.modalities)
        windows = " ".join(f"{w.modality}:{'open' if w.open else 'closed'}" for w in end.next_window)
        print(f"epoch {end.closed.epoch + 1:3d}/{self.epochs}  {traces}  next window {windows}", file=sys.stderr, flush=True)


def train(
    cfg: TrainConfig,
    client: RegulatorClient,
    data: Optional[DigitsSplit] = None,
    accumulate_grad_batches: int = 1,
    verbose: bool = False,
) -> dict[str, Any]:
    """Trains one model with Lightning through the regulator; the result shape of ``digits.train``."""
    torch.set_num_threads(cfg.threads)
    data = data or load_split(cfg.views)
    train_set = TensorDataset(*(torch.from_numpy(data.x_train[v]) for v in cfg.views), torch.from_numpy(data.y_train))
    module = DigitsModule(cfg, data.dims, train_set)
    job_id = cfg.job_id or f"lightning-digits-{cfg.profile}-s{cfg.seed}-{uuid.uuid4().hex[:8]}"
    inforeg = InfoRegCallback(client, lambda m: {v: m.model.encoders[v] for v in cfg.views}, **hook_options(cfg, job_id))
    callbacks: list[pl.Callback] = [inforeg] + ([EpochLog(inforeg, cfg.epochs)] if verbose else [])
    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        accelerator="gpu" if cfg.device.startswith("cuda") else "cpu",
        devices=1,
        accumulate_grad_batches=accumulate_grad_batches,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    t0 = time.perf_counter()
    trainer.fit(module)
    wall = time.perf_counter() - t0
    detail = client.get_session(job_id)
    device = next(module.model.parameters()).device
    xs_te = {v: torch.from_numpy(data.x_test[v]).to(device) for v in cfg.views}
    assert inforeg.hook is not None
    return {
        "job_id": job_id,
        "config": {**asdict(cfg), "accumulate_grad_batches": accumulate_grad_batches},
        **evaluate(module.model, xs_te, torch.from_numpy(data.y_test).to(device)),
        **session_summary(detail),
        "wall_s": wall,
        "hook": inforeg.hook.timings.as_dict(),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.lightning_digits", description=__doc__.split("\n\n")[0])
    add_training_flags(p)
    p.add_argument("--accumulate-grad-batches", type=int, default=1, help="micro-batches per optimizer step")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    with client_from_args(p, args) as client:
        result = train(cfg, client, accumulate_grad_batches=args.accumulate_grad_batches, verbose=True)
    write_result(result, args.out, f"{cfg.profile} (lightning)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
