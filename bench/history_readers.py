"""Readers never starve writers: another job's Report latency while clients read a long history.

    python -m bench.history_readers                     # 30,000-step session, 4 readers
    python -m bench.history_readers --rounds 3 --json results/history_readers.json

A closed 30,000-step session is written into a state file (through the regulator's own API),
then ``regulator serve`` serves it on one CPU and it is read once (its pages encoded once). One job reports (1 in flight, each Report a
closed-loop call with realistic statistics and an EndEpoch every 100 steps, the same load
generator as ``bench.server_load``) while 0 or 4 reader processes page through the whole 30,000
steps again and again (``RegulatorClient.steps``, each its own channel). Phases alternate
(without, with, without, with, ...) and the table shows the medians of the Report p50 and p90 of
each, and their ratio; the requirement of issue 8 item 3 is a ratio within 3x.

Placement: the server has the first CPU; the reporting job and the readers share the others, the
readers at the lowest priority (``nice 19``) so that on a 2-CPU machine they do not take the
reporting client's own CPU away: what is measured is the server's answer, as with readers on
other machines.

``run(...) -> dict`` is the entry point for ``make bench``; ``main()`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .output import emit, stamp
from .server_load import MODALITIES, Server, measure, pinned, placement

JOB = "long-history"


def write_history(state_dir: Path, steps: int) -> None:
    """A closed session of ``steps`` steps, every one answered by the regulator's own API."""
    from inforeg.regulator.v1 import regulator_pb2 as pb
    from regulator_service.wire.api import build_api
    from regulator_service.storage import SQLiteStore

    store = SQLiteStore(state_dir)
    api = build_api(store)
    api.manager.restore()
    rng = random.Random(0)
    api.open_session(pb.OpenSessionRequest(job_id=JOB, modalities=list(MODALITIES), profile=pb.Profile(official=pb.OfficialProfile())))
    for step in range(steps):
        api.report(pb.ReportRequest(
            job_id=JOB, epoch=step // 100, step=step, count=64,
            stats=[pb.ModalityStats(modality=m, score_sum=64 * rng.uniform(0.2, 0.95), fisher=abs(rng.gauss(0, 1e-4)))
                   for m in MODALITIES],
        ))
        if step % 100 == 99:
            api.end_epoch(pb.EndEpochRequest(job_id=JOB, epoch=step // 100))
    api.close_session(pb.CloseSessionRequest(job_id=JOB, attempt=0))
    store.close()


def read_loop(target: str, duration_s: float) -> dict[str, Any]:
    """One reader: every step of the session, again and again, for ``duration_s`` (at least once)."""
    from regulator_client import RegulatorClient

    steps = passes = 0
    deadline = time.monotonic() + duration_s
    with RegulatorClient.connect(target, timeout=60) as client:
        while passes == 0 or time.monotonic() < deadline:
            for _ in client.steps(JOB):
                steps += 1
            passes += 1
    return {"steps": steps, "passes": passes}


def _readers(target: str, n: int, duration_s: float, cpus: Sequence[int]) -> list[subprocess.Popen[str]]:
    cmd = ["nice", "-n", "19", sys.executable, "-m", "bench.history_readers", "--read", target, "--duration", str(duration_s)]
    return [subprocess.Popen(**pinned(cmd, cpus), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]


def run(
    steps: int = 30_000,
    readers: int = 4,
    rounds: int = 2,
    duration_s: float = 8.0,
    warmup_s: float = 2.0,
    progress: bool = True,
    server_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Report p50/p90 of another job without and with ``readers`` clients paging through a
    ``steps``-step history; medians over ``rounds`` alternations, and the with/without ratios.
    ``server_args``: extra ``regulator serve`` flags (e.g. ``--history-read-rate 0`` unpaced)."""
    server_cpus, load_cpus = placement()
    phases: dict[int, list[dict[str, Any]]] = {0: [], readers: []}
    reads: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        state = Path(tmp) / "state"
        t0 = time.perf_counter()
        write_history(state, steps)
        if progress:
            print(f"  wrote a {steps}-step history in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        server = Server("sqlite", server_cpus, Path(tmp), list(server_args), state_dir=state)
        try:
            # one read first, as on a server that has served this history before: every block
            # is encoded once, then kept (the phases measure continuous reading, not that once)
            t0 = time.perf_counter()
            read_loop(server.target, 0.0)
            cold_s = time.perf_counter() - t0
            for r in range(rounds):
                for n in (0, readers):
                    procs = _readers(server.target, n, warmup_s + duration_s + 2, load_cpus)
                    try:
                        res = measure(server, 1, duration_s, warmup_s, load_cpus)
                    finally:
                        for p in procs:
                            out, err = p.communicate(timeout=120)
                            if p.returncode != 0:
                                raise RuntimeError(f"a reader failed: {err[-2000:]}")
                            reads.append(json.loads(out.strip().splitlines()[-1]))
                    phases[n].append(res)
                    if progress:
                        print(f"  round {r + 1}/{rounds} readers {n}: Report p50 {res['p50_ms']:.2f} ms  "
                              f"p90 {res['p90_ms']:.2f} ms  ({res['qps']:.0f}/s)", file=sys.stderr, flush=True)
        finally:
            server.stop()
    rows = {
        n: {key: statistics.median(x[key] for x in runs) for key in ("p50_ms", "p90_ms", "p99_ms", "qps")}
        for n, runs in phases.items()
    }
    total_steps = sum(x["steps"] for x in reads)
    return {
        "benchmark": "history_readers",
        **stamp(),
        "server_cpus": server_cpus,
        "server_args": list(server_args),
        "load_cpus": load_cpus,
        "history_steps": steps,
        "readers": readers,
        "rounds": rounds,
        "duration_s": duration_s,
        "without_readers": rows[0],
        "with_readers": rows[readers],
        "p50_ratio": rows[readers]["p50_ms"] / rows[0]["p50_ms"],
        "p90_ratio": rows[readers]["p90_ms"] / rows[0]["p90_ms"],
        "steps_read_per_s": total_steps / (rounds * (warmup_s + duration_s + 2)),
        "first_read_s": cold_s,
        "phases": {str(n): runs for n, runs in phases.items()},
    }


def table(result: dict[str, Any]) -> str:
    w, r = result["without_readers"], result["with_readers"]
    readers = f"{result['readers']} readers of {result['history_steps']:,} steps"
    return "\n".join([
        f"history readers ({result['date']}, {result['machine']}; server on CPU {result['server_cpus']}; "
        f"median of {result['rounds']} round(s) x {result['duration_s']:g} s"
        + (f"; serve {' '.join(result['server_args'])}" if result.get("server_args") else "") + ")",
        f"{'another job, Report at 1 in flight':<36}{'p50 ms':>8}{'p90 ms':>8}{'Reports/s':>11}",
        f"{'  no readers':<36}{w['p50_ms']:>8.2f}{w['p90_ms']:>8.2f}{w['qps']:>11.0f}",
        f"{'  ' + readers:<36}{r['p50_ms']:>8.2f}{r['p90_ms']:>8.2f}{r['qps']:>11.0f}",
        f"{'  ratio (requirement: within 3x)':<36}{result['p50_ratio']:>8.2f}{result['p90_ratio']:>8.2f}",
        f"  (the readers read {result['steps_read_per_s']:,.0f} steps/s meanwhile; the first read of the "
        f"history, which encodes it, took {result['first_read_s']:.1f} s)",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.history_readers", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30_000)
    p.add_argument("--readers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--server-args", default="", metavar="FLAGS",
                   help="extra `regulator serve` flags, e.g. '--history-read-rate 0 --max-history-readers 0' (unpaced)")
    p.add_argument("--read", metavar="TARGET", help=argparse.SUPPRESS)  # internal: one reader process
    args = p.parse_args(argv)
    if args.read:
        print(json.dumps(read_loop(args.read, args.duration)))
        return 0
    result = run(args.steps, args.readers, args.rounds, args.duration, server_args=shlex.split(args.server_args))
    return emit(result, table(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
