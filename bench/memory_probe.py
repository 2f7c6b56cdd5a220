"""One long open session against ``--memory-budget``: the server's resident memory stays bounded.

    python -m bench.memory_probe                                  # 6,000 epochs, 16 modalities, 16Mi, SQLite
    python -m bench.memory_probe --store memory --epochs 20000     # the memory store: refused at the budget
    python -m bench.memory_probe --epochs 1000 --json out.json

Starts ``regulator serve --memory-budget B`` (a state directory, or ``--in-memory``), opens one
session of M modalities (profile ``paper``; ``official`` for 2) and runs E epochs of one Report
and one EndEpoch each, the issue's probe. Every E/samples epochs it reads the server's resident
memory (VmRSS, Linux) and what it accounted (``inforeg_regulator_memory_used_bytes``, all parts).
Prints the idle RSS (before the session), the RSS after a warm-up of ``--warmup`` epochs (SQLite's
page cache, gRPC's threads and the caches filled), the largest RSS and accounted memory seen, and
the growth per epoch after the warm-up. With SQLite every closed epoch but the newest two is spilled
(the store has it), so the growth is the policy's trace values (8 bytes per modality and epoch);
with the memory store every epoch and step stays and counts, and the first call past the budget
is refused with RESOURCE_EXHAUSTED, which the probe reports and stops at.

``run(...) -> dict`` is the entry point; ``main()`` prints the result (``docs/operations.md``,
"Memory", quotes it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence

from .output import emit

MIB = 1 << 20


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def accounted(metrics_port: int) -> int:
    """The server's accounted memory, all parts (its /metrics)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    return int(sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("inforeg_regulator_memory_used_bytes{")))


def run(
    epochs: int = 6000, modalities: int = 16, budget: str = "16Mi", store: str = "sqlite", samples: int = 12,
    warmup: int = 1500,
) -> dict[str, Any]:
    from regulator_client import RegulatorClient
    from regulator_client.errors import ResourceExhausted
    from regulator_service.capacity.memory_budget import parse_bytes
    from trainers.serverproc import ServerProcess

    names = [f"modality-{i:02d}" for i in range(modalities)]
    profile = "official" if modalities == 2 else "paper"
    every = max(1, epochs // samples)
    rows: list[dict[str, int]] = []
    refused_at, refusal = None, ""
    with tempfile.TemporaryDirectory(prefix="bench-memory-probe-") as tmp:
        state = str(Path(tmp) / "state") if store == "sqlite" else None
        with ServerProcess(state, extra_args=["--memory-budget", budget]) as server:
            assert server.proc is not None and server.metrics_port is not None
            pid, port = server.proc.pid, server.metrics_port
            idle = rss(pid)
            with RegulatorClient.connect(server.target, timeout=60) as client:
                client.open_session("probe", names, profile)
                for epoch in range(epochs):
                    try:
                        client.report("probe", attempt=0, epoch=epoch, step=epoch, count=8,
                                      score_sums={m: 1.0 + (epoch + i) % 7 for i, m in enumerate(names)},
                                      fisher={m: 0.1 + 0.001 * ((epoch * 7 + i) % 13) for i, m in enumerate(names)})
                        client.end_epoch("probe", attempt=0, epoch=epoch)
                    except ResourceExhausted as exc:
                        refused_at, refusal = epoch, str(exc)
                        break
                    if epoch + 1 == warmup or (epoch + 1) % every == 0 or epoch + 1 == epochs:
                        rows.append({"epochs": epoch + 1, "rss": rss(pid), "accounted": accounted(port)})
                rows.append({"epochs": refused_at if refused_at is not None else epochs, "rss": rss(pid),
                             "accounted": accounted(port)})
    after = [r for r in rows if r["epochs"] >= warmup]
    base = after[0] if after else rows[0]
    last = rows[-1]
    span = max(last["epochs"] - base["epochs"], 1)
    return {
        "benchmark": "memory_probe",
        "store": store,
        "budget_bytes": parse_bytes(budget),
        "modalities": modalities,
        "epochs": epochs,
        "refused_at_epoch": refused_at,
        "refusal": refusal,
        "idle_rss_bytes": idle,
        "warm_rss_bytes": base["rss"],
        "max_rss_bytes": max(r["rss"] for r in rows),
        "max_accounted_bytes": max(r["accounted"] for r in rows),
        "rss_growth_per_epoch_after_warmup": (last["rss"] - base["rss"]) / span,
        "samples": rows,
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"one {r['modalities']}-modality session, {r['store']} store, --memory-budget {r['budget_bytes'] / MIB:g} MiB:",
        "  epochs     RSS MiB   accounted MiB",
    ]
    lines += [f"  {s['epochs']:>6} {s['rss'] / MIB:>11.1f} {s['accounted'] / MIB:>15.2f}" for s in r["samples"]]
    lines += [
        f"  idle RSS {r['idle_rss_bytes'] / MIB:.1f} MiB; max RSS {r['max_rss_bytes'] / MIB:.1f} MiB "
        f"= budget + {(r['max_rss_bytes'] - r['budget_bytes']) / MIB:.1f} MiB; max accounted "
        f"{r['max_accounted_bytes'] / MIB:.2f} MiB; RSS growth after warm-up "
        f"{r['rss_growth_per_epoch_after_warmup']:.0f} B/epoch",
    ]
    if r["refused_at_epoch"] is not None:
        lines.append(f"  refused at epoch {r['refused_at_epoch']}: {r['refusal']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6000)
    p.add_argument("--modalities", type=int, default=16)
    p.add_argument("--budget", default="16Mi")
    p.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    p.add_argument("--samples", type=int, default=12, help="RSS readings over the run")
    p.add_argument("--warmup", type=int, default=1500, help="epochs before the growth is measured")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = run(args.epochs, args.modalities, args.budget, args.store, args.samples, args.warmup)
    return emit(result, table(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
