"""Training the audio-visual model through the regulator (the loop behind ``python -m trainers.av``).

Defaults are the released InfoReg code's: SGD lr 0.002, momentum 0.9, weight decay 1e-4 on every
parameter, StepLR(30, 0.1), batch 64, 50 epochs, loss ``CE(fused) + CE(audio) + CE(visual)``
(its three backward calls, as one), profile ``official`` with ``reference_modality audio``.

One optimizer step (``train_step``, shared with the GPU check), in the order mixed precision
needs: autocast forward -> ``hook.after_forward`` (the scores leave while backward runs) ->
``scaler.scale(loss).backward()`` -> ``hook.after_backward()`` (the hook, built with
``grad_scaler``/``optimizer``, unscales the gradients first and neither reports nor regulates a
step the scaler will skip) -> ``scaler.step`` -> ``scaler.update``. Without ``--amp fp16`` the
scaler is disabled and each of its calls is a no-op; bf16 needs no scaler.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from regulator_client import RegulatorClient
from regulator_client.hook import InfoRegHook

from ..digits import session_summary
from .data import AVData, Layout, collate, describe, load_data, raise_failures
from .model import MODALITIES, AVClassifier

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_workers() -> int:
    """DataLoader workers: 4, or fewer on a machine with fewer CPUs (torch warns beyond them)."""
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass
class AVConfig:
    dataset: str = "cremad"
    data_root: Optional[str] = None
    audio_root: Optional[str] = None
    visual_root: Optional[str] = None
    train_csv: Optional[str] = None
    test_csv: Optional[str] = None
    classes_file: Optional[str] = None
    skip_missing: bool = False
    fps: int = 3
    image_size: int = 224
    profile: str = "official"
    profile_params: dict[str, Any] = field(default_factory=lambda: {"reference_modality": "audio"})
    seed: int = 0
    epochs: int = 50
    batch_size: int = 64
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 30
    lr_gamma: float = 0.1
    unimodal_loss: bool = True  # the released code's L_fused + L_audio + L_visual
    device: str = "cpu"
    amp: Optional[str] = None  # None, "bf16" or "fp16"
    workers: int = field(default_factory=default_workers)
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default)
    max_steps_per_epoch: Optional[int] = None  # a quick check: stop each epoch early
    eval_every: int = 1  # test accuracy every N epochs (and always after the last); 0 = at the end only
    log_every: int = 20  # a progress line every N steps within an epoch; 0 = per epoch only
    job_id: Optional[str] = None
    record: Optional[str] = None
    on_unavailable: Optional[str] = None
    call_timeout: float = 10.0
    wait_timeout: float = 300.0

    def layout(self) -> Layout:
        return Layout.resolve(
            self.dataset, self.data_root, audio_root=self.audio_root, visual_root=self.visual_root,
            train_csv=self.train_csv, test_csv=self.test_csv, classes_file=self.classes_file,
        )

    def optimizer(self, model: torch.nn.Module) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.StepLR]:
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return opt, torch.optim.lr_scheduler.StepLR(opt, self.lr_step, self.lr_gamma)


@dataclass
class StepOutput:
    loss: float
    proximal: dict[str, float]
    skipped: bool  # fp16: the scaler found inf/NaN gradients and skipped the optimizer step


class Precision:
    """Autocast and the gradient scaler for ``--amp`` (none, bf16, fp16)."""

    def __init__(self, amp: Optional[str], device: torch.device) -> None:
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        self.amp = amp
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast(self) -> Any:
        dtype = AMP_DTYPES.get(self.amp or "", torch.float32)
        return torch.autocast(self.device_type, dtype=dtype, enabled=self.amp is not None)


def loss_fn(fused: Tensor, uni: dict[str, Tensor], y: Tensor, unimodal_loss: bool) -> Tensor:
    loss = F.cross_entropy(fused.float(), y)
    if unimodal_loss:
        loss = loss + sum(F.cross_entropy(u.float(), y) for u in uni.values())
    return loss


def train_step(
    model: AVClassifier,
    audio: Tensor,
    visual: Tensor,
    y: Tensor,
    opt: torch.optim.Optimizer,
    precision: Precision,
    hook: Optional[InfoRegHook],
    unimodal_loss: bool = True,
) -> StepOutput:
    """One optimizer step, regulated when ``hook`` is given (see the module docstring)."""
    opt.zero_grad(set_to_none=True)
    with precision.autocast():
        fused, uni = model(audio, visual)
        loss = loss_fn(fused, uni, y, unimodal_loss)
    if hook is not None:
        hook.after_forward(logits=uni, labels=y)
    scaler = precision.scaler
    scaler.scale(loss).backward()
    proximal: dict[str, float] = {}
    if hook is not None:
        proximal = hook.after_backward().proximal
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(opt)
    scaler.update()
    skipped = scale is not None and scaler.get_scale() < scale  # update() backs off after a skipped step
    return StepOutput(float(loss.detach()), proximal, skipped)


@torch.no_grad()
def evaluate(model: AVClassifier, batches: Iterable[Any], device: torch.device, precision: Precision) -> dict[str, Any]:
    """Fused and per-modality head accuracy on the test set."""
    model.eval()
    correct = {"fused": 0, **{m: 0 for m in MODALITIES}}
    n = 0
    for batch in batches:
        audio, visual, y = (t.to(device, non_blocking=True) for t in raise_failures(batch))
        with precision.autocast():
            fused, uni = model(audio, visual)
        correct["fused"] += int((fused.argmax(1) == y).sum())
        for m in MODALITIES:
            correct[m] += int((uni[m].argmax(1) == y).sum())
        n += int(y.numel())
    model.train()
    return {"fused_acc": correct["fused"] / n, "unimodal_acc": {m: correct[m] / n for m in MODALITIES}}


def loaders(cfg: AVConfig, data: AVData, device: torch.device) -> tuple[DataLoader, DataLoader]:
    common: dict[str, Any] = dict(
        batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate,
        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
    )
    g = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(data.train, shuffle=True, generator=g, **common), DataLoader(data.test, shuffle=False, **common)


def hook_for(cfg: AVConfig, client: RegulatorClient, model: AVClassifier, job_id: str,
             opt: torch.optim.Optimizer, precision: "Precision") -> InfoRegHook:
    fp16 = precision.scaler.is_enabled()
    return InfoRegHook(
        client, model.encoders(), job_id=job_id, rank=0, world_size=1, profile=cfg.profile,
        profile_params=cfg.profile_params, record=cfg.record, on_unavailable=cfg.on_unavailable,
        call_timeout=cfg.call_timeout, wait_timeout=cfg.wait_timeout,
        grad_scaler=precision.scaler if fp16 else None, optimizer=opt if fp16 else None,
    )


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train(cfg: AVConfig, client: RegulatorClient, data: Optional[AVData] = None, log: Callable[[str], None] = say) -> dict[str, Any]:
    """Trains through the regulator; returns accuracies, windows, regulated steps and timings."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    if cfg.amp == "fp16" and device.type == "cpu":
        log("warning: fp16 autocast on the CPU is very slow (no fp16 convolution kernels); use --amp bf16 there")
    data = data or load_data(cfg.layout(), cfg.fps, cfg.image_size, skip_missing=cfg.skip_missing)
    log(describe(data))
    torch.manual_seed(cfg.seed)
    model = AVClassifier(data.num_classes, cfg.fps).to(device)
    opt, sched = cfg.optimizer(model)
    precision = Precision(cfg.amp, device)
    train_loader, test_loader = loaders(cfg, data, device)
    job_id = cfg.job_id or f"av-{cfg.dataset}-{cfg.profile}-s{cfg.seed}-{uuid.uuid4().hex[:8]}"
    hook = hook_for(cfg, client, model, job_id, opt, precision)
    history: list[dict[str, Any]] = []
    steps = skipped = 0
    t0 = time.perf_counter()
    with hook:
        log(f"job {job_id} (attempt {hook.identity.attempt}), profile {cfg.profile}, {cfg.epochs} epochs on {device}"
            + (f", amp {cfg.amp}" if cfg.amp else ""))
        for epoch in range(cfg.epochs):
            hook.on_epoch_start(epoch)
            losses: list[float] = []
            regulated = 0
            t_epoch = time.perf_counter()
            for i, batch in enumerate(train_loader):
                if cfg.max_steps_per_epoch is not None and i >= cfg.max_steps_per_epoch:
                    break
                audio, visual, y = (t.to(device, non_blocking=True) for t in raise_failures(batch))
                out = train_step(model, audio, visual, y, opt, precision, hook, cfg.unimodal_loss)
                losses.append(out.loss)
                regulated += any(b > 0 for b in out.proximal.values())
                skipped += out.skipped
                steps += 1
                if cfg.log_every and (i + 1) % cfg.log_every == 0:
                    log(f"  epoch {epoch + 1} step {i + 1}/{len(train_loader)}  loss {sum(losses) / len(losses):.4f}")
            sched.step()
            end = hook.on_epoch_end()
            row: dict[str, Any] = {"epoch": epoch, "loss": sum(losses) / max(len(losses), 1), "regulated_steps": regulated,
                                   "steps": len(losses), "seconds": time.perf_counter() - t_epoch}
            last = epoch == cfg.epochs - 1
            if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                row.update(evaluate(model, test_loader, device, precision))
            history.append(row)
            log(epoch_line(row, cfg.epochs, end))
        detail = client.get_session(job_id)
    wall = time.perf_counter() - t0
    final = history[-1]
    tested = [r["fused_acc"] for r in history if "fused_acc" in r]
    return {
        "job_id": job_id,
        "attempt": hook.identity.attempt,
        "config": asdict(cfg),
        "data": {"train": len(data.train), "test": len(data.test), "classes": list(data.classes)},
        "fused_acc": final["fused_acc"],
        "unimodal_acc": final["unimodal_acc"],
        "best_fused_acc": max(tested),
        **session_summary(detail),
        "steps": steps,
        "amp_skipped_steps": skipped,
        "wall_s": wall,
        "hook": hook.timings.as_dict(),
        "fallback_steps": hook.fallbacks.fallback_steps,
        "epochs": history,
    }


def epoch_line(row: dict[str, Any], epochs: int, end: Any) -> str:
    """One progress line per epoch: loss, test accuracies, Fisher traces, next windows."""
    parts = [f"epoch {row['epoch'] + 1:3d}/{epochs}", f"loss {row['loss']:.4f}"]
    if "fused_acc" in row:
        uni = " ".join(f"{m} {100 * a:.1f}%" for m, a in row["unimodal_acc"].items())
        parts.append(f"test fused {100 * row['fused_acc']:.1f}% ({uni})")
    if end is not None:
        parts.append(" ".join(f"{m.modality}:Tr={m.fisher_trace:.3g}" for m in end.closed.modalities))
        parts.append("next window " + " ".join(f"{w.modality}:{'open' if w.open else 'closed'}" for w in end.next_window))
    parts.append(f"regulated {row['regulated_steps']}/{row['steps']} steps")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)
