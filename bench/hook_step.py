"""What the InfoReg hook costs a training step, measured side by side in one run.

    python -m bench.hook_step --workload av          # two ResNet-18 encoders, batch 8, CPU
    python -m bench.hook_step --workload digits      # the digits MLPs, one thread
    python -m bench.hook_step --workload av --device cuda --batch 64 --image 224 --amp bf16
    python -m bench.hook_step --workload digits --overlap off on backward   # each hook variant once per option

Every variant trains the same model (one model and optimizer shared by all, so every variant
sees the same weights, caches and allocator) and they take turns block by block, A B C A B C,
so that whatever else the machine does hits all of them alike. Reported per variant: the median
milliseconds per step over the rounds with min and max, the ratio to ``plain`` - the median of
the per-round ratios against the plain block of the same round, with min and max - and, for the
hook variants, where the hook's time went per step (``hook.timings``); and the wall-clock time
per step inside ``loss.backward()``, which a report thread's Python lengthens (the GIL).

Variants: ``plain`` (fused cross-entropy), ``plain + unimodal CE`` (the released InfoReg loss),
the hook in-process under ``official`` and ``paper`` (default parameters) with the window open
and with every window closed, and the hook through ``regulator serve`` on loopback (SQLite and
memory store), official with the window open. Hook variants use ``after_forward`` +
``after_backward``, so the round trip overlaps the backward pass, and measure inside one long
epoch (EndEpoch, once per epoch, is not in the blocks). The windows come from short warm-up
epochs before the measurement: official is open in epoch 0 (its k starts at 1) and closed after
an empty epoch (a zero trace gives k = NaN); paper is closed in its warm-up (epochs 0 and 1) and
open in epoch 2 after an empty epoch 0 and a one-step epoch 1 (growth from a zero trace is 1).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import signal
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .output import emit

PLAIN = "plain"
UNIMODAL = "plain + unimodal CE"
HOOK_PARTS = ("scores_s", "wait_s", "apply_s", "fisher_s", "report_s", "epoch_s")


@dataclass
class Workload:
    """A model with two encoders, its optimizer, and a way to run the forward pass of step i."""

    name: str
    model: nn.Module
    encoders: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    forward: Callable[[int], tuple[Tensor, dict[str, Tensor], Tensor]]  # -> fused, unimodal, labels
    steps_per_epoch: int  # a real epoch's length (informational: blocks stay in one epoch)
    device: torch.device
    describe: str
    profile_params: dict[str, Any] = field(default_factory=dict)


def av_workload(batch: int = 8, image: int = 112, frames: int = 1, device: str = "cpu", seed: int = 0) -> Workload:
    """The official InfoReg audio-visual model (trainers/av): ResNet-18 on a 1x257x188 log
    spectrogram, ResNet-18 on ``frames`` RGB frames of ``image``^2, concat, linear head; SGD as
    the official code (lr 0.002, momentum 0.9, weight decay 1e-4)."""
    from trainers.av.model import AVClassifier

    torch.manual_seed(seed)
    dev = torch.device(device)
    model = AVClassifier(num_classes=6, fps=frames).to(dev)
    audio, visual = model.example_inputs(batch, image_size=image, device=dev, seed=seed)
    labels = torch.randint(0, 6, (batch,), generator=torch.Generator().manual_seed(seed)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9, weight_decay=1e-4)

    def forward(i: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        fused, uni = model(audio, visual)
        return fused, uni, labels

    return Workload(
        "av", model, model.encoders(), opt, forward, 0, dev,
        f"ResNet-18 audio 1x257x188 + ResNet-18 visual {frames}x3x{image}x{image}, batch {batch}, {device}",
        {"reference_modality": "audio"},
    )


def digits_workload(device: str = "cpu", seed: int = 0) -> Workload:
    """The digits job of ``trainers.digits`` (fac + zer MLP encoders, batch 64, 25 steps/epoch)."""
    from trainers.digits import TrainConfig, epoch_order
    from trainers.digits_data import load_split
    from trainers.digits_model import ConcatFusionNet

    cfg = TrainConfig()
    data = load_split(cfg.views)
    dev = torch.device(device)
    xs = {v: torch.from_numpy(data.x_train[v]).to(dev) for v in cfg.views}
    y = torch.from_numpy(data.y_train).to(dev)
    torch.manual_seed(seed)
    model = ConcatFusionNet(data.dims).to(dev)
    opt, _ = cfg.optimizer(model.parameters())
    n = len(y)
    steps = (n + cfg.batch_size - 1) // cfg.batch_size
    order = [epoch_order(n, seed, e).to(dev) for e in range(4)]

    def forward(i: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        idx = order[(i // steps) % 4][(i % steps) * cfg.batch_size : (i % steps + 1) * cfg.batch_size]
        fused, uni = model({v: x[idx] for v, x in xs.items()})
        return fused, uni, y[idx]

    return Workload(
        "digits", model, {v: model.encoders[v] for v in cfg.views}, opt, forward, steps, dev,
        f"digits MLPs fac+zer, batch {cfg.batch_size}, {steps} steps/epoch, {device}",
    )


# -- the variants -------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    profile: Optional[str] = None  # None: no hook
    params: dict[str, Any] = field(default_factory=dict)
    target: Optional[str] = None  # "sqlite" / "memory": through a regulator serve process
    warmup: tuple[int, ...] = ()  # steps of each epoch before the measured one (sets the window)
    unimodal_loss: bool = False
    overlap: Any = "auto"  # the hook's overlap option
    hook: Any = None
    client: Any = None
    step: int = 0
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # this process's CPU seconds per step, per round
    backward_s: float = 0.0  # wall-clock seconds in loss.backward(), summed
    backward_times: list[float] = field(default_factory=list)  # per round: seconds per step in backward()
    part_rounds: list[dict[str, float]] = field(default_factory=list)  # per round: ms per step of each part
    parts: dict[str, float] = field(default_factory=dict)


def variants() -> list[Variant]:
    return [
        Variant(PLAIN),
        Variant(UNIMODAL, unimodal_loss=True),
        Variant("hook official, window open, in-process", "official"),
        Variant("hook official, windows closed, in-process", "official", warmup=(0,)),
        Variant("hook paper, window open, in-process", "paper", warmup=(0, 1)),
        Variant("hook paper, windows closed, in-process", "paper"),
        Variant("hook official, window open, server SQLite", "official", target="sqlite"),
        Variant("hook official, window open, server memory", "official", target="memory"),
    ]


def with_overlaps(v: Variant, overlap: Any) -> list[Variant]:
    """A hook variant once per overlap option (a list of them: side by side in one run)."""
    options = overlap if isinstance(overlap, (list, tuple)) else [overlap]
    if v.profile is None:
        return [v]
    if len(options) == 1:
        v.overlap = options[0]
        return [v]
    return [Variant(f"{v.name} [{OVERLAP_NAME[o]}]", v.profile, dict(v.params), v.target, v.warmup, v.unimodal_loss, o)
            for o in options]


OVERLAP_NAME = {"auto": "auto", True: "on", False: "off", "backward": "backward"}
OVERLAP_OF = {name: o for o, name in OVERLAP_NAME.items()}
EXPECTED_WINDOW = {"open": True, "closed": False}  # checked: a variant measures what it says


def _amp(device: torch.device, amp: Optional[str]) -> Any:
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def _one_step(w: Workload, v: Variant, amp: Optional[str]) -> None:
    opt = w.optimizer
    opt.zero_grad(set_to_none=True)
    with _amp(w.device, amp):
        fused, uni, y = w.forward(v.step)
        loss = F.cross_entropy(fused, y)
        if v.unimodal_loss:
            loss = loss + sum(F.cross_entropy(u, y) for u in uni.values())
    if v.hook is not None:
        v.hook.after_forward(logits=uni, labels=y)
    t0 = time.perf_counter()
    loss.backward()
    v.backward_s += time.perf_counter() - t0
    if v.hook is not None:
        v.hook.after_backward()
    opt.step()
    v.step += 1


def _block(w: Workload, v: Variant, steps: int, amp: Optional[str]) -> tuple[float, float]:
    """Seconds per step of one block, wall-clock and this process's CPU time (all its threads;
    not a server's): on a machine that other work loads, the CPU time is what the step itself
    spent, where the wall clock also counts the time it waited for a core."""
    sync = torch.cuda.synchronize if w.device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        _one_step(w, v, amp)
    sync()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def _open_hook(w: Workload, v: Variant, servers: dict[str, Any], amp: Optional[str], overlap: Any = "auto") -> None:
    from regulator_client import RegulatorClient
    from regulator_client.hook import InfoRegHook

    v.client = RegulatorClient.in_process() if v.target is None else RegulatorClient.connect(servers[v.target].target)
    params = {**(w.profile_params if v.profile == "official" else {}), **v.params}
    v.hook = InfoRegHook(
        v.client, w.encoders, job_id=f"bench-{w.name}-{uuid.uuid4().hex[:8]}", attempt=0, rank=0, world_size=1,
        profile=v.profile, profile_params=params, overlap=v.overlap,
    )
    v.hook.open()
    for n in v.warmup:  # the epochs that set the measured epoch's window
        v.hook.on_epoch_start()
        for _ in range(n):
            _one_step(w, v, amp)
        v.hook.on_epoch_end()
    v.hook.on_epoch_start()  # one long epoch
    window = [x.open for x in v.client.get_session(v.hook.identity.job_id).session.window]
    want = EXPECTED_WINDOW["open" if "window open" in v.name else "closed"]
    if any(window) != want:
        raise RuntimeError(f"{v.name}: the measured epoch's windows are {window}")


@contextlib.contextmanager
def _servers(needed: set[str]) -> Iterator[dict[str, Any]]:
    from trainers.serverproc import ServerProcess

    with tempfile.TemporaryDirectory(prefix="bench-hook-") as tmp:
        servers: dict[str, Any] = {}
        try:
            if "sqlite" in needed:
                servers["sqlite"] = ServerProcess(str(Path(tmp) / "state")).start()
            if "memory" in needed:
                servers["memory"] = ServerProcess(None).start()
            yield servers
        finally:
            for s in servers.values():
                s.stop()


def run(
    workload: str = "av",
    rounds: int = 24,
    block: int = 1,
    warmup: int = 2,
    threads: int = 2,
    device: str = "cpu",
    batch: int = 8,
    image: int = 112,
    frames: int = 1,
    amp: Optional[str] = None,
    only: Sequence[str] = (),
    progress: bool = True,
    overlap: Any = "auto",
) -> dict[str, Any]:
    """Measures every variant (or those whose name contains one of ``only``) and returns the
    table as a dict (see ``table``)."""
    torch.set_num_threads(threads)
    load_before = busy_warning(progress)
    w = av_workload(batch, image, frames, device) if workload == "av" else digits_workload(device)
    steps = block
    chosen = [v for v in variants() if not only or v.name == PLAIN or any(o in v.name for o in only)]
    chosen = [c for v in chosen for c in with_overlaps(v, overlap)]
    with _servers({v.target for v in chosen if v.target}) as servers:
        for v in chosen:
            if progress:
                print(f"  {w.name}: warming up {v.name}", file=sys.stderr, flush=True)
            if v.profile is not None:
                _open_hook(w, v, servers, amp, overlap)
            for _ in range(warmup):  # allocator, caches, the hook's first session calls
                _block(w, v, steps, amp)
            if v.hook is not None:
                v.hook.timings = type(v.hook.timings)()  # count the measured rounds only
        t_start = time.perf_counter()
        for r in range(rounds):
            for v in chosen:
                before = v.hook.timings.as_dict() if v.hook is not None else {}
                b0 = v.backward_s
                wall, cpu = _block(w, v, steps, amp)
                v.times.append(wall)
                v.cpu_times.append(cpu)
                v.backward_times.append((v.backward_s - b0) / steps)
                if v.hook is not None:
                    after = v.hook.timings.as_dict()
                    v.part_rounds.append({k: 1000 * (after[k] - before[k]) / steps for k in HOOK_PARTS})
            if progress:
                done = time.perf_counter() - t_start
                print(f"  {w.name}: round {r + 1}/{rounds} ({done:.0f} s)", file=sys.stderr, flush=True)
        for v in chosen:
            if v.hook is not None:  # medians over the rounds, like the step times
                v.parts = {k: statistics.median(r[k] for r in v.part_rounds) for k in HOOK_PARTS}
                v.parts["fallback_steps"] = v.hook.fallbacks.fallback_steps
                v.hook.close()
                v.client.close()
    plain = next(v for v in chosen if v.name == PLAIN)
    base, cpu_base = plain.times, plain.cpu_times
    rows = []
    for v in chosen:
        ratios = [t / b for t, b in zip(v.times, base)]
        cpu_ratios = [t / b for t, b in zip(v.cpu_times, cpu_base) if b > 0]
        rows.append({
            "variant": v.name,
            "ms_median": 1000 * statistics.median(v.times),
            "ms_min": 1000 * min(v.times),
            "ms_max": 1000 * max(v.times),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "cpu_ms_median": 1000 * statistics.median(v.cpu_times),
            "cpu_ratio_median": statistics.median(cpu_ratios) if cpu_ratios else None,
            "backward_ms_median": 1000 * statistics.median(v.backward_times),
            "hook_ms_per_step": v.parts,
        })
    return {
        "benchmark": f"hook_step/{w.name}",
        "workload": w.describe,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": threads,
        "amp": amp,
        "overlap": overlap,
        "rounds": rounds,
        "steps_per_block": steps,
        "load_average_1m": [load_before, busy_warning(progress)],
        "rows": rows,
    }


def busy_warning(progress: bool = True) -> float:
    """The 1-minute load average; a warning when other work competes for the CPUs (the ratios
    are measured side by side, but a busy machine still widens their spread)."""
    load = os.getloadavg()[0]
    if progress and load > 0.5 * (os.cpu_count() or 1):
        print(f"  note: load average {load:.1f} on {os.cpu_count()} CPUs: other work competes for them, "
              "the numbers will scatter", file=sys.stderr, flush=True)
    return load


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}, Python {platform.python_version()}"


def table(result: dict[str, Any]) -> str:
    W = max([44] + [len(r["variant"]) + 1 for r in result["rows"]])  # noqa: N806 (the name column's width)
    lines = [
        f"{result['benchmark']}: {result['workload']} ({result['date']}, {result['machine']}; torch {result['torch']}, "
        f"{result['threads']} thread(s){', autocast ' + result['amp'] if result['amp'] else ''}"
        f"{'' if result.get('overlap', ['auto']) in ('auto', ['auto']) else ', overlap ' + str(result['overlap'])}; "
        f"{result['rounds']} interleaved rounds of {result['steps_per_block']} steps)",
        f"{'variant':<{W}}{'ms/step':>9}{'(min-max)':>17}{'x plain':>9}{'(min-max)':>15}{'CPU ms':>9}{'CPU x plain':>13}"
        f"{'backward':>10}",
    ]
    for row in result["rows"]:
        cpu_ratio = row.get("cpu_ratio_median")
        lines.append(
            f"{row['variant']:<{W}}{row['ms_median']:>9.2f}{'(%.1f-%.1f)' % (row['ms_min'], row['ms_max']):>17}"
            f"{row['ratio_median']:>9.3f}{'(%.3f-%.3f)' % (row['ratio_min'], row['ratio_max']):>15}"
            f"{row.get('cpu_ms_median', float('nan')):>9.2f}{cpu_ratio if cpu_ratio is not None else float('nan'):>13.3f}"
            f"{row.get('backward_ms_median', float('nan')):>10.2f}"
        )
    lines.append("(CPU: this process's CPU time per step, all its threads, a server's not counted: on a loaded "
                 "machine the steadier figure; x plain: median of the per-round ratios; backward: ms per step "
                 "in loss.backward(), wall clock)")
    hooked = [r for r in result["rows"] if r["hook_ms_per_step"]]
    if hooked:
        lines.append("")
        lines.append(f"{'hook ms/step (median): where the time went':<{W}}" + "".join(f"{k[:-2]:>9}" for k in HOOK_PARTS))
        for row in hooked:
            parts = row["hook_ms_per_step"]
            lines.append(f"{row['variant']:<{W}}" + "".join(f"{parts[k]:>9.2f}" for k in HOOK_PARTS))
        lines.append("(scores: after_forward; wait: after_backward until the answer is there - with an in-process "
                     "regulator on a CPU the report runs inline, inside wait; report: host sync + request + round trip, "
                     "in the background thread overlapping backward when the regulator is a server)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hook_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("av", "digits"), default="av")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: av 24, digits 20)")
    p.add_argument("--block", type=int, default=None, help="steps per block (default: av 1, digits 25)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured blocks per variant first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: av 2, digits 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8, help="av batch size")
    p.add_argument("--image", type=int, default=112, help="av: visual frame size")
    p.add_argument("--frames", type=int, default=1, help="av: visual frames per clip")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="autocast the forward pass")
    p.add_argument("--only", nargs="*", default=(), help="variants whose name contains one of these (plain always runs)")
    p.add_argument("--overlap", nargs="+", choices=tuple(OVERLAP_OF), default=["auto"],
                   help="the hook's overlap option: the report on a thread from after_forward (on) or from the start "
                        "of the backward pass (backward), or inline (off); several: each hook variant once per option")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers it started, too
    digits = args.workload == "digits"
    result = run(
        args.workload, args.rounds or (20 if digits else 24), args.block or (25 if digits else 1), args.warmup,
        args.threads or (1 if digits else 2), args.device, args.batch, args.image, args.frames, args.amp, args.only,
        overlap=[OVERLAP_OF[o] for o in args.overlap],
    )
    return emit(result, table(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
