"""DDP fan-in: how many Reports a multi-rank job sends the regulator per optimizer step.

    python -m bench.ddp_fanin --nproc 2 --epochs 2

Runs ``torchrun --nproc_per_node N -m trainers.digits_ddp`` against a ``regulator serve``
process on loopback and counts the Reports the server received, from its own metrics: unary
``grpc_server_handled_total{grpc_method="Report"}`` (every code) plus the messages of Report
streams, ``grpc_server_msg_received_total{grpc_method="ReportStream"}``, against the job's optimizer
steps (25 per epoch). The job's leader (rank 0) reports for the whole job, so the answer is 1
whatever the world size; a job of older clients, where every rank reports, gives N.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence

from .output import emit

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 25  # 1,600 training samples, global batch 64


def scrape(metrics_port: int) -> list[Any]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def handled(samples: list[Any], method: str) -> float:
    """Unary calls of ``method`` the server finished, whatever their code."""
    return sum(s.value for s in samples if s.name == "grpc_server_handled_total" and s.labels.get("grpc_method") == method)


def reports(samples: list[Any]) -> float:
    """Reports the server received however sent: unary Report calls it finished, and the messages
    of ReportStreams (a stream is one RPC, counted once at its end, that carries many Reports)."""
    return handled(samples, "Report") + sum(
        s.value
        for s in samples
        if s.name == "grpc_server_msg_received_total" and s.labels.get("grpc_method") == "ReportStream"
    )


def run(nproc: int = 2, epochs: int = 2, profile: str = "official", progress: bool = True) -> dict[str, Any]:
    from trainers.serverproc import ServerProcess

    with tempfile.TemporaryDirectory(prefix="bench-fanin-") as tmp, ServerProcess(str(Path(tmp) / "state")) as server:
        assert server.metrics_port is not None
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "trainers.digits_ddp", "--target", server.target, "--job-id", "fanin", "--profile", profile,
               "--epochs", str(epochs)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"the DDP job failed:\n{proc.stdout}\n{proc.stderr}")
        wall = time.perf_counter() - t0
        samples = scrape(server.metrics_port)
        count, ends = reports(samples), handled(samples, "EndEpoch")
    steps = STEPS_PER_EPOCH * epochs
    if progress:
        print(f"  ddp fan-in: {nproc} ranks, {steps} steps, {count:.0f} Reports ({wall:.0f} s)", file=sys.stderr, flush=True)
    return {
        "benchmark": "ddp_fanin",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "world_size": nproc,
        "optimizer_steps": steps,
        "reports_handled": count,
        "end_epochs_handled": ends,
        "reports_per_step": count / steps,
        "wall_s": wall,
    }


def table(result: dict[str, Any]) -> str:
    return (
        f"DDP fan-in ({result['date']}): a {result['world_size']}-rank trainers.digits_ddp job, "
        f"{result['optimizer_steps']} optimizer steps -> {result['reports_handled']:.0f} Reports handled by the server "
        f"(unary Report calls and ReportStream messages), {result['reports_per_step']:.2f} per step; "
        f"{result['end_epochs_handled']:.0f} EndEpoch"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ddp_fanin", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = run(args.nproc, args.epochs)
    return emit(result, table(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
