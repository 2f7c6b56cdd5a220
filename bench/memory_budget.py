"""The memory budget against the process's real memory.

    python -m bench.memory_budget                            # --memory-budget 64Mi, 16 modalities
    python -m bench.memory_budget --budget 256Mi --modalities 2
    python -m bench.memory_budget --estimates                # the per-object estimates it accounts

Starts ``regulator serve --memory-budget B``, then opens sessions of M modalities and reports
into them until the server refuses a new session (RESOURCE_EXHAUSTED): the first 20 sessions
fill their whole answer cache (1,100 steps), the others 30 steps. Prints how many sessions were
admitted, what the server accounted (``inforeg_regulator_memory_used_bytes``) and how much its
resident memory grew (VmRSS, Linux): the accounting is meant to be an upper bound of the growth.

``run(...) -> dict`` is the entry point for ``make bench``; ``main()`` prints the result.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .output import emit


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def run(budget: str = "64Mi", modalities: int = 16, full_sessions: int = 20) -> dict[str, Any]:
    import urllib.request

    from regulator_client import RegulatorClient
    from regulator_client.errors import ResourceExhausted
    from regulator_service.capacity.memory_budget import parse_bytes
    from trainers.serverproc import ServerProcess

    names = [f"modality-{i:02d}" for i in range(modalities)]
    profile = "official" if modalities == 2 else "paper"
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        with ServerProcess(str(Path(tmp) / "state"), extra_args=["--memory-budget", budget, "--max-sessions", "1000000"]) as server:
            assert server.proc is not None
            time.sleep(1.0)
            idle = rss(server.proc.pid)
            admitted, refusal = 0, ""
            with RegulatorClient.connect(server.target, timeout=60) as client:
                try:
                    while True:
                        job = f"job-{admitted}"
                        client.open_session(job, names, profile)
                        for step in range(1100 if admitted < full_sessions else 30):
                            client.report(job, attempt=0, epoch=0, step=step, count=8,
                                          score_sums={m: 1.0 + (step % 7) for m in names}, fisher={m: 0.1 for m in names})
                        admitted += 1
                except ResourceExhausted as exc:
                    refusal = str(exc)
            text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
            used = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("inforeg_regulator_memory_used_bytes{")}
            grown = rss(server.proc.pid) - idle
    return {
        "benchmark": "memory_budget",
        "budget_bytes": parse_bytes(budget),
        "modalities": modalities,
        "sessions_admitted": admitted,
        "refusal": refusal,
        "accounted_bytes": used,
        "idle_rss_bytes": idle,
        "rss_growth_bytes": grown,
    }


def table(r: dict[str, Any]) -> str:
    mib = 1 << 20
    parts = ", ".join(f"{k} {v / mib:.1f}" for k, v in r["accounted_bytes"].items())
    return "\n".join([
        f"memory budget {r['budget_bytes'] / mib:.0f} MiB, {r['modalities']} modalities: {r['sessions_admitted']} sessions admitted, then "
        f"RESOURCE_EXHAUSTED",
        f"  accounted {sum(r['accounted_bytes'].values()) / mib:.1f} MiB ({parts}); resident memory grew "
        f"{r['rss_growth_bytes'] / mib:.1f} MiB over {r['idle_rss_bytes'] / mib:.1f} MiB idle",
    ])


def estimates(modalities: Sequence[int] = (2, 16)) -> str:
    """What the budget charges per object (``regulator_service/capacity/memory_budget.py``): docs/performance.md's
    table and the arithmetic under it come from these figures."""
    from regulator_service.capacity.memory_budget import answer_bytes, epoch_bytes
    from regulator_service.core.accounting import session_bytes
    from regulator_service.policy import BUILTIN_PROFILES

    paper = BUILTIN_PROFILES.get("paper").restore({})  # the profile of the figures in docs/performance.md
    rows = [("session in memory", lambda m: session_bytes(paper, m)), ("closed epoch kept", epoch_bytes), ("cached answer", answer_bytes)]
    head = "per (KiB)".ljust(20) + "".join(f"{m:>6} modalities" for m in modalities)
    return "\n".join([head] + [name.ljust(20) + "".join(f"{fn(m) / 1024:>17.1f}" for m in modalities) for name, fn in rows])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="64Mi")
    p.add_argument("--modalities", type=int, default=16)
    p.add_argument("--json", default=None)
    p.add_argument("--estimates", action="store_true", help="print the per-object estimates and exit (starts no server)")
    args = p.parse_args(argv)
    if args.estimates:
        print(estimates())
        return 0
    result = run(args.budget, args.modalities)
    return emit(result, table(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
