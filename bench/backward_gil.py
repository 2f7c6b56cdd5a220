"""Whether Python on another thread runs beside a backward pass or instead of it.

    python -m bench.backward_gil                 # the digits step; the thread runs 0.3 ms, a Report's length
    python -m bench.backward_gil --hold-ms 30 --steps 20

The digits step (``bench.hook_step``'s workload, plain training, one torch thread). When its
backward pass begins - a gradient hook on each encoder's last parameter, as the hook's
``overlap="backward"`` uses (``client/report_trigger.py``) - a thread that was started beforehand
is woken, as the hook's report thread is, and for ``--hold-ms`` either runs a pure-Python loop (it
holds the GIL but for the interpreter's forced switches) or sleeps (the GIL released). Printed:
the backward pass's wall-clock time per case. If the autograd engine never needed the GIL, the
loop would not delay it; it does, by the whole loop or by a forced switch (the interpreter's
switch interval, 5 ms), which is why a report thread's Python cannot hide behind a backward pass
made of small operations (docs/performance.md, "Where a fast step's time goes").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Callable, Optional, Sequence


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Worker:
    """A thread that runs ``job(hold_s)`` once per ``wake`` (the first per step)."""

    def __init__(self, job: Optional[Callable[[float], None]], hold_s: float) -> None:
        self.job, self.hold_s = job, hold_s
        self.go, self.done = threading.Event(), threading.Event()
        self.woken, self.running = False, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def wake(self, grad: object) -> None:
        if self.job is not None and not self.woken:
            self.woken = True
            self.go.set()

    def join(self) -> None:
        if self.woken:
            self.done.wait()
            self.done.clear()
            self.woken = False

    def stop(self) -> None:
        self.running = False
        self.go.set()
        self.thread.join()

    def _run(self) -> None:
        while True:
            self.go.wait()
            self.go.clear()
            if not self.running:
                return
            self.job(self.hold_s)  # type: ignore[misc]
            self.done.set()


def measure(hold_s: float, steps: int) -> dict[str, float]:
    """Median wall-clock milliseconds of the backward pass: alone, beside a sleeping thread,
    beside a thread running Python."""
    import torch
    import torch.nn.functional as F

    from .hook_step import digits_workload

    torch.set_num_threads(1)
    w = digits_workload()
    last = [list(e.parameters())[-1] for e in w.encoders.values()]
    cases: dict[str, Optional[Callable[[float], None]]] = {"alone": None, "beside a sleeping thread": time.sleep,
                                                           "beside a Python loop": _spin}
    workers = {name: Worker(job, hold_s) for name, job in cases.items()}  # woken by the hook, as the report thread is
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(steps + 2):
        for name, worker in workers.items():  # the cases take turns, step by step
            w.optimizer.zero_grad(set_to_none=True)
            fused, _, y = w.forward(i)
            loss = F.cross_entropy(fused, y)
            handles = [p.register_hook(worker.wake) for p in last]
            t0 = time.perf_counter()
            loss.backward()
            elapsed = time.perf_counter() - t0
            for h in handles:
                h.remove()
            worker.join()
            w.optimizer.step()
            if i >= 2:  # the first steps warm the allocator and caches
                times[name].append(elapsed)
    for worker in workers.values():
        worker.stop()
    out = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backward_gil", description=__doc__.split("\n\n")[0])
    p.add_argument("--hold-ms", type=float, default=0.3, help="how long the thread loops or sleeps")
    p.add_argument("--steps", type=int, default=200, help="steps per case (the median is printed)")
    args = p.parse_args(argv)
    result = measure(args.hold_ms / 1000, args.steps)
    print(f"digits backward pass, ms (median of {args.steps} steps; the thread wakes when the backward pass "
          f"begins and runs {args.hold_ms:g} ms; the cases take turns):")
    for name, ms in result.items():
        print(f"  {name:<26} {ms:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
