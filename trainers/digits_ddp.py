"""The digits job under torch.distributed DDP, regulated consistently across ranks.

    regulator serve --port 50051 &
    torchrun --standalone --nproc_per_node 2 -m trainers.digits_ddp --target 127.0.0.1:50051 \\
        --profile official --epochs 50 --coef-log logs/

Each rank trains on its ``DistributedSampler`` shard (global batch 64 = 2 x 32 by default) and
DDP all-reduces the gradients. Per step the InfoReg hook sums the ranks' score sums onto rank 0
(one small reduce, right after the forward pass), rank 0 alone reports the step - one Report per
step for the whole job - and the answer reaches every rank in one broadcast after the backward
pass: all ranks apply identical factors (identical GE noise too: it is seeded from the job, the
step and the tensor). The job's identity comes from torchrun (TORCHELASTIC_RUN_ID, RANK,
WORLD_SIZE, TORCHELASTIC_RESTART_COUNT) unless ``--job-id`` is given. ``--coef-log DIR`` writes
every applied factor to ``DIR/rank<R>.jsonl``. ``--checkpoint PATH``: rank 0 saves the model,
optimizer, schedule and the hook's state after every epoch, and every rank resumes from it when
it exists, also against a regulator that starts empty (a preempted pod's new sidecar).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from regulator_client.cli_args import add_connection_flags, connect_from_args
from regulator_client.hook import InfoRegHook

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .digits import TrainConfig, evaluate, loss_fn, positive_int, weights_digest
from regulator_client.profiles import PROFILE_NAMES, parse_profile_params

from .digits_data import VIEWS, load_split
from .digits_model import ConcatFusionNet


def main(argv: Optional[Sequence[str]] = None, on_step: Optional[Callable[[int], None]] = None) -> int:
    """``on_step(step)`` runs after every optimizer step (fault-injection tests)."""
    p = argparse.ArgumentParser(prog="torchrun ... -m trainers.digits_ddp", description=__doc__.split("\n\n")[0])
    add_connection_flags(p, timeout_flag="--call-timeout", default_timeout=10.0)
    p.add_argument("--views", nargs="+", choices=VIEWS, default=["fac", "zer"], metavar="VIEW", help=f"views: {', '.join(VIEWS)}")
    p.add_argument("--profile", choices=PROFILE_NAMES, default="official")
    p.add_argument("--reference-modality", default=None)
    p.add_argument("--profile-param", action="append", default=[], metavar="NAME=VALUE",
                   help="any parameter of the profile, e.g. history=2 for official (repeatable)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="rank 0 saves a checkpoint here after every epoch; every rank resumes from it when it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=positive_int, default=50)
    p.add_argument("--global-batch", type=int, default=64, help="split evenly over the ranks")
    p.add_argument("--unimodal-loss", action="store_true")
    p.add_argument("--job-id", default=None, help="default: torchrun's TORCHELASTIC_RUN_ID")
    p.add_argument("--on-unavailable", choices=("wait", "neutral", "last"), default=None,
                   help="when the regulator is down (default: $REGULATOR_ON_UNAVAILABLE, else wait)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--coef-log", default=None, help="directory for per-rank applied coefficients (JSONL)")
    p.add_argument("--out", default=None, help="rank 0 writes the results here as JSON")
    p.add_argument("--save-weights", default=None, help="rank 0 saves the final state_dict here")
    p.add_argument("--scale-params", choices=("conv", "weights", "all"), default="conv",
                   help="tensors that get ogm-ge's gradient scale and noise (the MLPs have no 4-D 'conv' tensors)")
    args = p.parse_args(argv)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")
    torch.set_num_threads(1)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {world} ranks")

    views = tuple(args.views)
    data = load_split(views)
    train_set = TensorDataset(*(torch.from_numpy(data.x_train[v]) for v in views), torch.from_numpy(data.y_train))
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.global_batch // world, sampler=sampler, num_workers=args.workers)

    try:
        params = parse_profile_params(args.profile, args.profile_param)
    except ValueError as exc:
        raise SystemExit(f"--profile-param: {exc}") from None
    if args.reference_modality:
        params["reference_modality"] = args.reference_modality
    settings = {"views": list(views), "profile": args.profile, "profile_params": params, "seed": args.seed,
                "global_batch": args.global_batch, "world_size": world, "unimodal_loss": args.unimodal_loss,
                "scale_params": args.scale_params}
    resume = load_checkpoint(args.checkpoint, settings) if args.checkpoint else None
    torch.manual_seed(args.seed)
    model = ConcatFusionNet(data.dims).to(device)
    if resume is not None:
        model.load_state_dict(resume.model)  # on every rank, before DDP compares the replicas
    ddp = DistributedDataParallel(model)
    opt, sched = TrainConfig().optimizer(ddp.parameters())
    if resume is not None:
        opt.load_state_dict(resume.optimizer)
        sched.load_state_dict(resume.scheduler)
    client = connect_from_args(args, args.call_timeout)
    hook = InfoRegHook(
        client,
        {v: model.encoders[v] for v in views},
        job_id=args.job_id,
        profile=args.profile,
        profile_params=params,
        on_unavailable=args.on_unavailable,
        call_timeout=args.call_timeout,
        keep_history=True,
        scale_params=args.scale_params,
    )
    if resume is not None:
        hook.load_state_dict(resume.hook)  # its closed epochs resume the job on an empty regulator too
        print(f"[rank {rank}] resuming job {hook.identity.job_id} at epoch {resume.epoch} (step {resume.step})", flush=True)
    start_epoch = resume.epoch if resume is not None else 0
    log_file = None
    if args.coef_log:
        Path(args.coef_log).mkdir(parents=True, exist_ok=True)
        log_file = open(Path(args.coef_log) / f"rank{rank}.jsonl", "w", encoding="utf-8")
    t0 = time.perf_counter()
    with hook:
        tag = f"[rank {rank}/{world} job {hook.identity.job_id} attempt {hook.identity.attempt}]"  # as opened
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            hook.on_epoch_start(epoch)
            for *xs, y in loader:
                batch = {v: x.to(device) for v, x in zip(views, xs)}
                y = y.to(device)
                opt.zero_grad(set_to_none=True)
                fused, uni = ddp(batch)
                hook.after_forward(logits=uni, labels=y)  # scores out while backward runs
                loss_fn(fused, uni, y, args.unimodal_loss).backward()
                res = hook.after_backward()
                opt.step()
                if log_file is not None:
                    log_file.write(json.dumps({
                        "rank": rank, "epoch": res.epoch, "step": res.step, "proximal": res.proximal,
                        "grad_scale": res.grad_scale, "noise_scale": res.noise_scale, "window": res.window,
                        "fallback": res.fallback, "reports": hook.reports,
                    }) + "\n")
                if on_step is not None:
                    on_step(res.step)
            sched.step()
            end = hook.on_epoch_end()
            applied = [r.proximal for r in hook.history if r.epoch == epoch]
            regulated = {v: sum(a[v] > 0 for a in applied) for v in views}
            window = {w.modality: w.open for w in end.next_window} if end is not None else "unknown (deferred)"
            print(f"{tag} epoch {epoch + 1}/{args.epochs}: regulated steps {regulated}, next window {window}", flush=True)
            if args.checkpoint and rank == 0 and end is not None:  # only epochs the regulator has closed
                save_checkpoint(args.checkpoint, Checkpoint(
                    hook.identity.job_id, epoch + 1, hook.step, settings, model.state_dict(), opt.state_dict(),
                    sched.state_dict(), hook.state_dict(),
                ))
    if log_file is not None:
        log_file.close()
    wall = time.perf_counter() - t0
    digest = weights_digest(model)
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, digest)
    if rank == 0:
        result = {
            "job_id": hook.identity.job_id,
            "world_size": world,
            **evaluate(model, {v: torch.from_numpy(data.x_test[v]).to(device) for v in views}, torch.from_numpy(data.y_test).to(device)),
            "weights_digest_per_rank": digests,
            "applied": [[r.proximal[v] for v in views] for r in hook.history],
            "wall_s": wall,
            "hook": hook.timings.as_dict(),
        }
        uni = ", ".join(f"{v} {100 * a:.1f}%" for v, a in result["unimodal_acc"].items())
        print(f"{tag} fused {100 * result['fused_acc']:.2f}%, unimodal heads {uni}, identical weights on all ranks: {len(set(digests)) == 1}, {wall:.1f}s", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
        if args.save_weights:
            torch.save(model.state_dict(), args.save_weights)
    client.close()
    # Tear down together: a rank that destroys its gloo group while a peer still holds the
    # connection open can abort at exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's finalization: after a correct run (outputs written, the
    # process group destroyed), a rank could still abort at exit under load - "terminate called
    # without an active exception", SIGABRT - when a gloo worker thread meets the interpreter's
    # teardown (pytorch/pytorch#179291 discusses it). Nothing is left to run at exit but that.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
