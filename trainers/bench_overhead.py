"""What regulation costs a training step, measured side by side in one run.

    python -m trainers.bench_overhead --epochs 10

Trains the digits job (same seed, same data order) four ways, interleaved round by round so that
machine noise hits all of them alike: without any hook, with the hook on the ``none`` profile
in-process (statistics only), with the hook in-process under ``official``, and with the hook
through a ``regulator serve`` process over loopback gRPC (SQLite state). Reports the median
milliseconds per step and the ratio to plain training.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

from regulator_client import RegulatorClient

from .digits import TrainConfig, fit_plain, train
from .digits_data import load_split
from .digits_model import ConcatFusionNet
from .serverproc import ServerProcess


def plain(epochs: int, data: Any) -> float:
    """Seconds per step of the same loop without regulation."""
    torch.manual_seed(0)
    model = ConcatFusionNet(data.dims)
    xs = {v: torch.from_numpy(data.x_train[v]) for v in data.views}
    t0 = time.perf_counter()
    steps = fit_plain(model, xs, torch.from_numpy(data.y_train), epochs, 0)
    return (time.perf_counter() - t0) / steps


def hooked(epochs: int, data: Any, client_factory: Callable[[], RegulatorClient], profile: str, tag: str) -> float:
    with client_factory() as client:
        res = train(TrainConfig(profile=profile, epochs=epochs, job_id=f"bench-{tag}-{time.time_ns()}"), client, data)
    return res["wall_s"] / res["hook"]["steps"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.bench_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_split(("fac", "zer"))
    with ServerProcess(None) as server:
        ways: dict[str, Callable[[], float]] = {
            "plain loop (no hook)": lambda: plain(args.epochs, data),
            "hook, none, in-process": lambda: hooked(args.epochs, data, RegulatorClient.in_process, "none", "none"),
            "hook, official, in-process": lambda: hooked(args.epochs, data, RegulatorClient.in_process, "official", "inproc"),
            "hook, official, gRPC server": lambda: hooked(
                args.epochs, data, lambda: RegulatorClient.connect(server.target), "official", "grpc"
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in ways}
        for r in range(args.rounds):
            for name, fn in ways.items():
                times[name].append(fn())
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    base = statistics.median(times["plain loop (no hook)"])
    print(f"{'configuration':30s} {'ms/step':>8s} {'x plain':>8s}   ({args.rounds} rounds x {args.epochs} epochs x 25 steps, median)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:30s} {1000 * med:8.2f} {med / base:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
