"""A few steps of the audio-visual trainer on a GPU with synthetic tensors: plain, and through the
hook (``official``, in-process regulator unless ``--target``), side by side, per precision.

    python -m trainers.av.gpu_check                          # CUDA, batch 64, 224x224, 3 frames, fp32 and bf16
    python -m trainers.av.gpu_check --amp none bf16 fp16 --steps 30
    python -m trainers.av.gpu_check --device cpu --batch-size 2 --image-size 32 --steps 2 --warmup 1   # a smoke run

No data set is needed: ``AVClassifier.example_inputs`` makes a batch of log-spectrograms and
frames of the real shapes, with random labels. Each step runs ``trainers.av.train.train_step``
(the trainer's own step) on two copies of the model with the same initial weights: the plain
one, then the regulated one, so every printed ratio compares two steps taken on the same device
moments apart. Times are wall-clock around each step with the device synchronised
(``torch.cuda.synchronize``); the first ``--warmup`` pairs (cuDNN autotuning, allocator growth)
are run but not counted. Prints one line per step and the median per precision; ``--out``
writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from regulator_client import RegulatorClient
from regulator_client.cli_args import add_connection_flags, connect_from_args
from regulator_client.hook import InfoRegHook

from .model import AVClassifier
from .train import AVConfig, Precision, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(device: torch.device, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = train_step(*args, **kwargs)
    sync(device)
    return time.perf_counter() - t0, out


def run_precision(args: argparse.Namespace, client: RegulatorClient, amp: Optional[str], device: torch.device) -> dict[str, Any]:
    cfg = AVConfig()
    models, opts = [], []
    for _ in range(2):  # plain, regulated: identical initial weights
        torch.manual_seed(args.seed)
        model = AVClassifier(args.classes, args.fps).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        models.append(model)
        opts.append(cfg.optimizer(model)[0])
    precisions = [Precision(amp, device), Precision(amp, device)]
    audio, visual = models[0].example_inputs(args.batch_size, args.image_size, device, seed=args.seed)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=torch.Generator().manual_seed(args.seed)).to(device)
    fp16 = amp == "fp16"
    hook = InfoRegHook(
        client, models[1].encoders(), job_id=f"gpu-check-{amp or 'fp32'}-{time.time_ns()}", rank=0, world_size=1,
        profile=args.profile, profile_params={"reference_modality": "audio"} if args.profile == "official" else None,
        grad_scaler=precisions[1].scaler if fp16 else None, optimizer=opts[1] if fp16 else None,
    )
    rows = []
    with hook:
        hook.on_epoch_start(0)
        for i in range(args.warmup + args.steps):
            t_plain, out_plain = timed_step(device, models[0], audio, visual, labels, opts[0], precisions[0], None)
            t_hook, out_hook = timed_step(device, models[1], audio, visual, labels, opts[1], precisions[1], hook)
            row = {
                "step": i, "warmup": i < args.warmup, "plain_ms": 1e3 * t_plain, "hook_ms": 1e3 * t_hook,
                "ratio": t_hook / t_plain, "loss_plain": out_plain.loss, "loss_hook": out_hook.loss,
                "proximal": out_hook.proximal, "skipped": out_hook.skipped,
            }
            rows.append(row)
            beta = " ".join(f"{m}={b:.3f}" for m, b in row["proximal"].items())
            print(f"{amp or 'fp32':>4} step {i:3d}{' (warm-up)' if row['warmup'] else '':10s} plain {row['plain_ms']:8.1f} ms  "
                  f"hook {row['hook_ms']:8.1f} ms  x{row['ratio']:.3f}  loss {row['loss_plain']:.4f}/{row['loss_hook']:.4f}  beta {beta}"
                  + ("  (fp16 step skipped by the scaler)" if row["skipped"] else ""), flush=True)
        hook.on_epoch_end()
    counted = [r for r in rows if not r["warmup"]]
    summary = {
        "amp": amp or "fp32",
        "median_plain_ms": statistics.median(r["plain_ms"] for r in counted),
        "median_hook_ms": statistics.median(r["hook_ms"] for r in counted),
        "median_ratio": statistics.median(r["ratio"] for r in counted),
        "regulated_steps": sum(any(b > 0 for b in r["proximal"].values()) for r in counted),
        "hook_timings": hook.timings.as_dict(),
        "steps": rows,
    }
    if device.type == "cuda":
        summary["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.av.gpu_check", description=__doc__.split("\n\n")[0])
    add_connection_flags(p, timeout_flag="--call-timeout", default_timeout=10.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", nargs="+", choices=("none", "bf16", "fp16"), default=["none", "bf16"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--fps", type=int, default=3)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--profile", default="official")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster convolutions on recent GPUs)")
    p.add_argument("--out", default=None, help="write the per-step figures as JSON")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here (torch.cuda.is_available() is False); --device cpu runs a smoke check")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    print(f"batch {args.batch_size}, audio 1x257x188, frames 3x{args.fps}x{args.image_size}x{args.image_size}, profile {args.profile}, "
          f"{args.warmup} warm-up + {args.steps} counted steps per precision", flush=True)
    client = connect_from_args(args, args.call_timeout) if args.target else RegulatorClient.in_process()
    results = []
    with client:
        for amp in args.amp:
            results.append(run_precision(args, client, None if amp == "none" else amp, device))
    print("\nprecision   plain ms/step   hook ms/step   hook/plain (median)   regulated steps")
    for r in results:
        print(f"{r['amp']:>9}   {r['median_plain_ms']:13.1f}   {r['median_hook_ms']:12.1f}   {r['median_ratio']:19.3f}   "
              f"{r['regulated_steps']}/{args.steps}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": str(device), "args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
