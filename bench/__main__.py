"""``make bench``: what regulation costs, side by side against its baseline, in one run.

    python -m bench                                  # everything, about 6 minutes on 2 cores
    python -m bench --parts av digits --json out.json

Parts: ``av`` (the hook on a ResNet-18 audio-visual CPU step), ``digits`` (the hook on the digits
MLP step), ``server`` (Report load against the grpcio echo floor, ``bench.server_load``: the
server's CPU per Report against the floor's per call, with the SQLite store, the same answering a
stream per client, PostgreSQL (unary and a stream; its cluster apart from the server's CPU) when
it is installed, and the memory store),
``ddp`` (Reports per optimizer step of a 2-rank DDP job). Prints each table as it completes and
writes every number, with date and machine, to ``--json`` (default ``results/bench.json``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any, Optional, Sequence

PARTS = ("av", "digits", "server", "ddp")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--av-rounds", type=int, default=24, help="AV rounds of one step per variant")
    p.add_argument("--digits-rounds", type=int, default=20)
    p.add_argument("--server-duration", type=float, default=3.0, help="seconds per server-load cell")
    p.add_argument("--server-rounds", type=int, default=3,
                   help="server-load rounds, servers alternating within each; the table gives their medians "
                        "(this machine's CPU speed alone varies up to 2x within seconds: python -m bench.machine_noise)")
    p.add_argument("--json", default="results/bench.json")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers it started, too

    from . import ddp_fanin, hook_step, server_load
    from .output import write_json

    results: dict[str, Any] = {}
    t0 = time.perf_counter()

    def done(name: str, result: dict[str, Any], text: str) -> None:
        results[name] = result
        print(text + "\n", flush=True)
        if args.json:  # after every part, so an interrupted run keeps what it measured
            write_json(args.json, results)

    if "av" in args.parts:
        r = hook_step.run("av", rounds=args.av_rounds, block=1, threads=2)
        done("av", r, hook_step.table(r))
    if "digits" in args.parts:
        r = hook_step.run("digits", rounds=args.digits_rounds, block=25, threads=1)
        done("digits", r, hook_step.table(r))
    if "server" in args.parts:
        from .pg_cluster import bindir

        servers = ("echo", "sqlite", "sqlite-stream", *(("postgresql", "postgresql-stream") if bindir() else ()), "memory")
        r = server_load.run(duration_s=args.server_duration, rounds=args.server_rounds, servers=servers)
        done("server_load", r, server_load.table(r))
    if "ddp" in args.parts:
        r = ddp_fanin.run(nproc=2, epochs=2)
        done("ddp_fanin", r, ddp_fanin.table(r))
    print(f"make bench: {time.perf_counter() - t0:.0f} s; numbers in {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
