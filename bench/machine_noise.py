"""How steady this machine's CPU is: the CPU time a fixed pure-Python loop takes, again and again.

    python -m bench.machine_noise                 # 20 s on every CPU at once
    python -m bench.machine_noise --seconds 5 --json out.json

Every figure of ``bench.server_load`` is CPU time per call, and CPU time is only a steady measure
of work where the CPU runs at one speed. On a virtual machine whose cores share their physical
cores with other tenants it does not: the same loop can take twice the CPU time from one second
to the next. This prints, per CPU, the CPU milliseconds of each repetition of the same loop
(one process pinned to each CPU, all at once, a pause between repetitions), so a reader can tell
how much of a difference between two cells measured seconds apart the machine alone can make.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any, Optional, Sequence

from bench.output import emit, stamp

LOOP = 300_000  # iterations of the loop: 13-23 ms of CPU on this project's machine


def _loop() -> float:
    """CPU milliseconds of one fixed loop."""
    t0 = time.process_time()
    x = 0
    for i in range(LOOP):
        x += i * i
    return 1e3 * (time.process_time() - t0)


def _probe(cpu: int, seconds: float, pause_s: float, out: Any) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(_loop())
        time.sleep(pause_s)
    out.put((cpu, samples))


def run(seconds: float = 20.0, pause_s: float = 0.2) -> dict[str, Any]:
    """Per CPU: the CPU ms of every repetition, and their min, median and max."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    queue: Any = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_probe, args=(cpu, seconds, pause_s, queue)) for cpu in cpus]
    for p in procs:
        p.start()
    found = dict(queue.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    rows = [{"cpu": cpu, "ms": found[cpu], "min_ms": min(found[cpu]), "median_ms": statistics.median(found[cpu]),
             "max_ms": max(found[cpu])} for cpu in cpus]
    return {
        "benchmark": "machine_noise",
        **stamp(),
        "loop": LOOP,
        "seconds": seconds,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"machine noise ({result['date']}, {result['machine']}; the same {result['loop']:,}-step Python loop "
             f"for {result['seconds']:g} s on every CPU at once)",
             f"{'CPU':>4}{'loops':>7}{'min ms':>9}{'median ms':>11}{'max ms':>9}{'max/min':>9}"]
    for row in result["rows"]:
        lines.append(f"{row['cpu']:>4}{len(row['ms']):>7}{row['min_ms']:>9.1f}{row['median_ms']:>11.1f}"
                     f"{row['max_ms']:>9.1f}{row['max_ms'] / row['min_ms']:>9.2f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.machine_noise", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="how long each CPU repeats the loop")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error("--seconds must be > 0")
    result = run(args.seconds)
    return emit(result, table(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
