"""Multimodal digits training through the regulator (single process).

    python -m trainers.digits --target 127.0.0.1:50051 --profile official --seed 0

Two (or more) views of the UCI Multiple Features digits, one MLP encoder per view, concat
fusion, one linear head; SGD lr 0.01 momentum 0.9 weight decay 1e-4, StepLR(30, 0.1), 50 epochs,
batch 64. The fused cross-entropy is the loss (``--unimodal-loss`` adds the unimodal terms, as
the released InfoReg code always does). The data order of epoch e is
``randperm(n, seed + e)``, the same order ``DistributedSampler`` deals out to DDP ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from regulator_client import RegulatorClient
from regulator_client.cli_args import add_connection_flags, connect_from_args
from regulator_client.errors import RegulatorError
from regulator_client.hook import InfoRegHook
from regulator_client.profiles import PROFILE_NAMES, parse_profile_params
from regulator_client.stats import SELECTORS

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .device import add_device_flag
from .digits_data import VIEWS, DigitsSplit, load_split
from .digits_model import ConcatFusionNet


@dataclass
class TrainConfig:
    views: tuple[str, ...] = ("fac", "zer")
    profile: str = "official"
    profile_params: dict[str, Any] = field(default_factory=dict)
    # Which encoder tensors a gradient scale (ogm-ge) multiplies. The released OGM-GE code scales
    # only 4-D conv kernels; the digits encoders are MLPs with none, so their weight matrices are
    # the analogue (biases excluded, as the conv-only rule excludes them).
    scale_params: str = "weights"
    seed: int = 0
    epochs: int = 50
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 30
    lr_gamma: float = 0.1
    unimodal_loss: bool = False
    job_id: Optional[str] = None
    record: Optional[str] = None
    device: str = "cpu"
    threads: int = 1
    on_unavailable: Optional[str] = None  # the hook's mode when the regulator is down: wait, neutral, last
    call_timeout: float = 10.0
    wait_timeout: float = 300.0
    save_weights: Optional[str] = None  # torch.save(state_dict) here at the end
    checkpoint: Optional[str] = None  # saved after every epoch, resumed from when it exists

    def resume_settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (not the epoch count: a job may grow)."""
        keep = ("views", "profile", "profile_params", "scale_params", "seed", "batch_size", "lr", "momentum",
                "weight_decay", "lr_step", "lr_gamma", "unimodal_loss")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k in keep}

    def optimizer(self, params: Any) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.StepLR]:
        """The optimizer and schedule every digits trainer uses (plain, hook, DDP, Lightning)."""
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return opt, torch.optim.lr_scheduler.StepLR(opt, self.lr_step, self.lr_gamma)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The permutation DistributedSampler(shuffle=True, seed=seed) uses in ``epoch``."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g)


def loss_fn(fused: Tensor, unimodal: dict[str, Tensor], y: Tensor, unimodal_loss: bool) -> Tensor:
    loss = F.cross_entropy(fused, y)
    if unimodal_loss:  # one backward of the sum == the released code's three backward calls
        loss = loss + sum(F.cross_entropy(u, y) for u in unimodal.values())
    return loss


@torch.no_grad()
def evaluate(model: ConcatFusionNet, xs: dict[str, Tensor], y: Tensor) -> dict[str, Any]:
    model.eval()
    fused, uni = model(xs)
    model.train()
    return {
        "fused_acc": (fused.argmax(1) == y).double().mean().item(),
        "unimodal_acc": {v: (uni[v].argmax(1) == y).double().mean().item() for v in model.views},
    }


def session_summary(detail: Any) -> dict[str, Any]:
    """From a GetSession answer, per modality: epochs with the window open, steps with a non-zero
    coefficient, and the Fisher trace of every closed epoch."""
    closed = [e for e in detail.epochs if e.closed]
    mods = list(detail.session.modalities)
    return {
        "window_open_epochs": {m: sum(int(e.modalities[i].window.open) for e in closed) for i, m in enumerate(mods)},
        "regulated_steps": {m: sum(e.modalities[i].regulated_steps for e in closed) for i, m in enumerate(mods)},
        "fisher_trace": {m: [e.modalities[i].fisher_trace for e in closed] for i, m in enumerate(mods)},
    }


def hook_options(cfg: TrainConfig, job_id: str) -> dict[str, Any]:
    """The InfoRegHook keywords a TrainConfig decides (shared with the Lightning trainer)."""
    return dict(
        job_id=job_id,
        profile=cfg.profile,
        profile_params=cfg.profile_params,
        scale_params=cfg.scale_params,
        record=cfg.record,
        on_unavailable=cfg.on_unavailable,
        call_timeout=cfg.call_timeout,
        wait_timeout=cfg.wait_timeout,
    )


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes: equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(
    cfg: TrainConfig,
    client: RegulatorClient,
    data: Optional[DigitsSplit] = None,
    log: Any = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> dict[str, Any]:
    """Trains one model through the regulator; returns accuracies, windows and timings.

    ``log(epoch, end_epoch_response)`` runs after every epoch, ``on_step(step)`` after every
    optimizer step (progress output, fault-injection tests)."""
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    data = data or load_split(cfg.views)
    xs_tr = {v: torch.from_numpy(data.x_train[v]).to(device) for v in cfg.views}
    y_tr = torch.from_numpy(data.y_train).to(device)
    xs_te = {v: torch.from_numpy(data.x_test[v]).to(device) for v in cfg.views}
    y_te = torch.from_numpy(data.y_test).to(device)
    torch.manual_seed(cfg.seed)
    model = ConcatFusionNet(data.dims).to(device)
    opt, sched = cfg.optimizer(model.parameters())
    resume = load_checkpoint(cfg.checkpoint, cfg.resume_settings()) if cfg.checkpoint else None
    if resume is not None:
        if cfg.job_id and cfg.job_id != resume.job_id:
            raise ValueError(f"{cfg.checkpoint} belongs to job {resume.job_id!r}, not {cfg.job_id!r}")
        model.load_state_dict(resume.model)
        opt.load_state_dict(resume.optimizer)
        sched.load_state_dict(resume.scheduler)
        print(f"resuming job {resume.job_id} at epoch {resume.epoch} (step {resume.step}) from {cfg.checkpoint}", file=sys.stderr)
    job_id = cfg.job_id or (resume.job_id if resume else f"digits-{cfg.profile}-s{cfg.seed}-{uuid.uuid4().hex[:8]}")
    start_epoch, start_step = (resume.epoch, resume.step) if resume else (0, 0)
    hook = InfoRegHook(
        client, {v: model.encoders[v] for v in cfg.views}, rank=0, world_size=1, keep_history=True,
        start_epoch=start_epoch, start_step=start_step, **hook_options(cfg, job_id),
    )
    if resume is not None and resume.hook:  # with the closed epochs: resumes on an empty regulator too
        hook.load_state_dict(resume.hook)
    n = len(y_tr)
    t0 = time.perf_counter()
    with hook:
        for epoch in range(start_epoch, cfg.epochs):
            hook.on_epoch_start(epoch)
            order = epoch_order(n, cfg.seed, epoch).to(device)
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                y = y_tr[idx]
                opt.zero_grad(set_to_none=True)
                fused, uni = model({v: xs_tr[v][idx] for v in cfg.views})
                hook.after_forward(logits=uni, labels=y)  # the scores leave while backward runs
                loss_fn(fused, uni, y, cfg.unimodal_loss).backward()
                hook.after_backward()
                opt.step()
                if on_step is not None:
                    on_step(hook.step - 1)
            sched.step()
            end = hook.on_epoch_end()
            if log is not None and end is not None:
                log(epoch, end)
            if cfg.checkpoint and end is not None:  # only epochs the regulator has closed
                save_checkpoint(cfg.checkpoint, Checkpoint(
                    job_id, epoch + 1, hook.step, cfg.resume_settings(), model.state_dict(), opt.state_dict(), sched.state_dict(),
                    hook.state_dict(),
                ))
        detail = client.get_session(job_id)
    wall = time.perf_counter() - t0
    if cfg.save_weights:
        torch.save(model.state_dict(), cfg.save_weights)
    return {
        "job_id": job_id,
        "attempt": hook.identity.attempt,
        "resumed_at_epoch": start_epoch,
        "config": asdict(cfg),
        **evaluate(model, xs_te, y_te),
        **session_summary(detail),
        "wall_s": wall,
        "hook": hook.timings.as_dict(),
        "fallback_steps": hook.fallbacks.fallback_steps,
        "applied": [[r.proximal[v] for v in cfg.views] for r in hook.history],
        "weights_digest": weights_digest(model),
    }


def fit_plain(model: ConcatFusionNet, xs: dict[str, Tensor], y: Tensor, epochs: int, seed: int) -> int:
    """``train``'s loop without any regulation: same optimizer, schedule, data order and fused
    loss. Returns the number of optimizer steps."""
    cfg = TrainConfig()
    opt, sched = cfg.optimizer(model.parameters())
    steps = 0
    for epoch in range(epochs):
        order = epoch_order(len(y), seed, epoch)
        for start in range(0, len(y), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            fused, _ = model({v: x[idx] for v, x in xs.items()})
            F.cross_entropy(fused, y[idx]).backward()
            opt.step()
            steps += 1
        sched.step()
    return steps


def train_alone(view: str, seed: int, data: DigitsSplit, epochs: int = 50, threads: int = 1) -> float:
    """Reference: test accuracy of one view's encoder + its own head, trained alone."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = ConcatFusionNet({view: data.dims[view]})
    fit_plain(model, {view: torch.from_numpy(data.x_train[view])}, torch.from_numpy(data.y_train), epochs, seed)
    return evaluate(model, {view: torch.from_numpy(data.x_test[view])}, torch.from_numpy(data.y_test))["fused_acc"]


def positive_int(text: str) -> int:
    """An argparse type for counts that must be at least 1 (epochs: 0 would train nothing and
    still print a result)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """The flags every digits trainer shares (connection, job, profile, schedule, output)."""
    add_connection_flags(p, timeout_flag="--call-timeout", default_timeout=10.0)
    p.add_argument("--in-process", action="store_true", help="run the policy in this process (no server)")
    p.add_argument("--views", nargs="+", choices=VIEWS, default=["fac", "zer"], metavar="VIEW",
                   help=f"views, one modality each: {', '.join(VIEWS)} (default fac zer)")
    p.add_argument("--profile", choices=PROFILE_NAMES, default="official")
    p.add_argument("--reference-modality", default=None, help="official profile: reference (default: first view)")
    p.add_argument("--profile-param", action="append", default=[], metavar="NAME=VALUE",
                   help="any parameter of the profile, e.g. alpha=0.5 for ogm-ge (repeatable; see `regulator replay --help`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=positive_int, default=50)
    p.add_argument("--unimodal-loss", action="store_true", help="add the unimodal CE terms (InfoReg*)")
    p.add_argument("--scale-params", choices=SELECTORS, default=TrainConfig.scale_params,
                   help="tensors a gradient scale (ogm-ge) multiplies: all, weights (default: the MLP "
                   "encoders' weight matrices) or conv (4-D kernels only, the released OGM-GE rule)")
    p.add_argument("--job-id", default=None)
    p.add_argument("--record", default=None, help="write the statistics trace to this file")
    add_device_flag(p)
    p.add_argument("--on-unavailable", choices=("wait", "neutral", "last"), default=None,
                   help="when the regulator is down: wait (then fail), or train on with zero/last coefficients "
                        "(default: $REGULATOR_ON_UNAVAILABLE, else wait)")
    p.add_argument("--out", default=None, help="write the result as JSON here")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        views=tuple(args.views),
        profile=args.profile,
        profile_params=profile_params_from_args(args),
        seed=args.seed,
        epochs=args.epochs,
        unimodal_loss=args.unimodal_loss,
        scale_params=args.scale_params,
        job_id=args.job_id,
        record=args.record,
        device=args.device,
        on_unavailable=args.on_unavailable,
        call_timeout=args.call_timeout,
    )


def profile_params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    try:
        params = parse_profile_params(args.profile, args.profile_param)
    except ValueError as exc:
        raise SystemExit(f"--profile-param: {exc}") from None
    if args.reference_modality:
        params["reference_modality"] = args.reference_modality
    return params


def client_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> RegulatorClient:
    if args.in_process and args.target:
        p.error("--in-process and --target exclude each other")
    return RegulatorClient.in_process() if args.in_process else connect_from_args(args, args.call_timeout)


def print_epoch(epochs: int) -> Callable[[int, Any], None]:
    """Progress on stderr after every epoch: traces and the next epoch's windows."""

    def progress(epoch: int, end: Any) -> None:
        traces = " ".join(f"{m.modality}:Tr={m.fisher_trace:.3g}" for m in end.closed.modalities)
        windows = " ".join(f"{w.modality}:{'open' if w.open else 'closed'}" for w in end.next_window)
        print(f"epoch {epoch + 1:3d}/{epochs}  {traces}  next window {windows}", file=sys.stderr, flush=True)

    return progress


def write_result(result: dict[str, Any], out: Optional[str], label: str) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    uni = ", ".join(f"{v} {100 * a:.1f}%" for v, a in result["unimodal_acc"].items())
    print(f"{label}: fused {100 * result['fused_acc']:.2f}%, unimodal heads {uni}, {result['wall_s']:.1f}s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.digits", description=__doc__.split("\n\n")[0])
    add_training_flags(p)
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="save a checkpoint here after every epoch, and resume from it when it exists "
                        "(a retried process continues the job as the regulator's next attempt)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    cfg.checkpoint = args.checkpoint
    try:
        with client_from_args(p, args) as client:
            result = train(cfg, client, log=print_epoch(cfg.epochs))
    except RegulatorError as exc:  # e.g. a profile parameter the regulator refuses: one line
        print(f"{p.prog}: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    write_result(result, args.out, cfg.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
