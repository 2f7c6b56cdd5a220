"""The Report as the hook sends it, through the in-process client: CPU per Report, hot and cold.

    python -m bench.report_path                          # this checkout
    python -m bench.report_path --baseline /tmp/before   # and another checkout (a copy of an older commit)

Each Report defers its Fisher values (``fisher_deferred``) and carries the previous step's
(``measured``), with an EndEpoch every 100 steps, exactly as ``InfoRegHook`` sends them; the
answer comes back through ``RegulatorClient.in_process()``'s transport. ``hot``: Reports in a
tight loop; ``cold``: a 4 MB tensor copy between Reports, as a training step's tensors evict the
interpreter's code and data from the caches between two Reports - what the hook's Report really
costs inside a step. The figure is the minimum over ``--runs`` runs of this process's CPU time
per Report (the minimum: other work on a shared machine only ever adds to it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

MODALITIES = ("fac", "zer")
END_EVERY = 100
# import name -> folder of a checkout (pyproject.toml's package-dir)
PACKAGES = {"regulator_client": "client", "regulator_service": "regulator_service", "inforeg": "proto/inforeg"}


def measure(reports: int, cold: bool) -> float:
    """CPU microseconds per Report of one run (a fresh in-process regulator and session)."""
    import torch

    from inforeg.regulator.v1 import regulator_pb2 as pb
    from regulator_client import RegulatorClient

    torch.set_num_threads(1)
    transport = RegulatorClient.in_process().transport
    transport.open_session(pb.OpenSessionRequest(job_id="job", modalities=list(MODALITIES),
                                                 profile=pb.Profile(official=pb.OfficialProfile())))

    def fishers(step: int) -> list[pb.ModalityFisher]:
        return [pb.ModalityFisher(modality=m, fisher=1e-4 * (1 + (step * 7 + i) % 13)) for i, m in enumerate(MODALITIES)]

    requests = [
        pb.ReportRequest(
            job_id="job", epoch=s // END_EVERY, step=s, count=64,
            stats=[pb.ModalityStats(modality=m, score_sum=20.0 + (s * 3 + i) % 17, fisher_deferred=True)
                   for i, m in enumerate(MODALITIES)],
            measured=[pb.MeasuredFisher(step=s - 1, modalities=fishers(s - 1))] if s % END_EVERY else [],
        )
        for s in range(reports)
    ]
    a, b = torch.randn(1 << 20), torch.empty(1 << 20)
    spent = 0.0
    for s, request in enumerate(requests):
        if cold:
            b.copy_(a)
        t0 = time.process_time()
        transport.report(request)
        spent += time.process_time() - t0
        if (s + 1) % END_EVERY == 0:
            transport.end_epoch(pb.EndEpochRequest(job_id="job", epoch=s // END_EVERY,
                                                   measured=pb.MeasuredFisher(step=s, modalities=fishers(s))))
    return 1e6 * spent / reports


def run(reports: int = 2000, runs: int = 5) -> dict[str, float]:
    return {kind: min(measure(reports, kind == "cold") for _ in range(runs)) for kind in ("hot", "cold")}


def run_in(checkout: str, reports: int, runs: int) -> dict[str, float]:
    """``run`` on another checkout's client and regulator: this file as a script, with that
    checkout's packages first on the path under their import names."""
    root = Path(checkout).resolve()
    with tempfile.TemporaryDirectory(prefix="bench-report-path-") as tmp:
        for name, folder in PACKAGES.items():
            os.symlink(root / folder, Path(tmp) / name)
        env = {**os.environ, "PYTHONPATH": tmp}
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--reports", str(reports), "--runs", str(runs),
                               "--emit-json"], cwd=tmp, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"the run in {checkout} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--reports", type=int, default=2000, help="Reports per run")
    p.add_argument("--runs", type=int, default=5, help="runs; the minimum is reported")
    p.add_argument("--baseline", metavar="CHECKOUT", help="also measure another checkout, alternating with this one")
    p.add_argument("--emit-json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.emit_json:
        print(json.dumps(run(args.reports, args.runs)))
        return 0
    here = str(Path(__file__).resolve().parents[1])
    rows = {"this checkout": run_in(here, args.reports, args.runs)}
    if args.baseline:
        rows["baseline"] = run_in(args.baseline, args.reports, args.runs)
        again = run_in(here, args.reports, args.runs)  # A B A: the machine's drift shows
        rows["this checkout"] = {k: min(v, again[k]) for k, v in rows["this checkout"].items()}
    print(f"hook-shaped Report, in-process, CPU us per Report (min of {args.runs} runs of {args.reports}):")
    for name, r in rows.items():
        print(f"  {name:<14} hot {r['hot']:7.1f}   cold {r['cold']:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
