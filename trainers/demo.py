"""The demo: a regulator server plus the digits job through it under none, official and paper.

    python -m trainers.demo --state-dir .regulator --out results/demo.json

Starts ``regulator serve`` on a free port (state in ``--state-dir``), trains every
profile x seed through it (two processes at a time), trains each view alone as a reference,
prints the comparison (mean +- std over seeds, and the paired difference of the weak view's head
between ``official`` and ``none``), writes every number as JSON, and stops the server.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from regulator_client.profiles import PROFILE_NAMES

from .serverproc import ServerProcess


def _run_job(target: str, cfg: dict[str, Any]) -> dict[str, Any]:
    from regulator_client import RegulatorClient

    from .digits import TrainConfig, train

    with RegulatorClient.connect(target) as client:
        return train(TrainConfig(**cfg), client)


def _run_alone(view: str, seed: int, epochs: int) -> tuple[str, int, float]:
    from .digits import train_alone
    from .digits_data import load_split

    return view, seed, train_alone(view, seed, load_split([view]), epochs)


def _ms(xs: Sequence[float], scale: float = 100.0) -> str:
    xs = [scale * x for x in xs]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):5.1f} ± {sd:4.1f}"


def summarize(runs: list[dict[str, Any]], alone: dict[str, list[float]], views: Sequence[str], profiles: Sequence[str]) -> dict[str, Any]:
    by = {p: sorted((r for r in runs if r["config"]["profile"] == p), key=lambda r: r["config"]["seed"]) for p in profiles}
    summary: dict[str, Any] = {"profiles": {}}
    for p, rs in by.items():
        summary["profiles"][p] = {
            "seeds": [r["config"]["seed"] for r in rs],
            "fused_acc": [r["fused_acc"] for r in rs],
            "unimodal_acc": {v: [r["unimodal_acc"][v] for r in rs] for v in views},
            "window_open_epochs": {v: [r["window_open_epochs"].get(v, 0) for r in rs] for v in views},
            "regulated_steps": {v: [r["regulated_steps"].get(v, 0) for r in rs] for v in views},
            "wall_s": [r["wall_s"] for r in rs],
        }
    weak = views[-1]
    if "none" in by and "official" in by:
        base = {r["config"]["seed"]: r["unimodal_acc"][weak] for r in by["none"]}
        diffs = [r["unimodal_acc"][weak] - base[r["config"]["seed"]] for r in by["official"] if r["config"]["seed"] in base]
        summary["official_minus_none_weak_head"] = {
            "view": weak,
            "diffs": diffs,
            "mean": statistics.mean(diffs) if diffs else None,
            "wins": sum(d > 0 for d in diffs),
            "pairs": len(diffs),
        }
    summary["alone_acc"] = alone
    return summary


def format_table(summary: dict[str, Any], views: Sequence[str]) -> str:
    head = f"{'profile':9s} | {'fused acc %':>13s} | " + " | ".join(f"{v + ' head %':>13s}" for v in views)
    head += " | " + " | ".join(f"{v + ' win ep':>9s}" for v in views) + f" | {'wall s':>6s}"
    lines = [head, "-" * len(head)]
    for p, s in summary["profiles"].items():
        row = f"{p:9s} | {_ms(s['fused_acc']):>13s} | " + " | ".join(f"{_ms(s['unimodal_acc'][v]):>13s}" for v in views)
        row += " | " + " | ".join(f"{statistics.mean(s['window_open_epochs'][v]):9.1f}" for v in views)
        row += f" | {statistics.mean(s['wall_s']):6.1f}"
        lines.append(row)
    if summary.get("alone_acc"):
        row = f"{'alone':9s} | {'':>13s} | " + " | ".join(
            f"{_ms(summary['alone_acc'][v]):>13s}" if v in summary["alone_acc"] else f"{'':>13s}" for v in views
        )
        lines.append(row + "   (each view's encoder trained alone, reference)")
    d = summary.get("official_minus_none_weak_head")
    if d and d["pairs"]:
        lines.append(
            f"\nweak view {d['view']!r} head, official - none (paired by seed): "
            f"{100 * d['mean']:+.1f} points, higher in {d['wins']} of {d['pairs']} seeds"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--state-dir", default=".regulator", help="server state directory (default .regulator)")
    p.add_argument("--target", default=None, help="use this running regulator instead of starting one")
    p.add_argument("--profiles", nargs="+", default=["none", "official", "paper"], choices=PROFILE_NAMES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--views", nargs="+", default=["fac", "zer"], help="strong view first, weak view last")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--workers", type=int, default=2, help="training processes at a time")
    p.add_argument("--no-alone", action="store_true", help="skip the single-view reference runs")
    p.add_argument("--out", default="results/demo.json")
    args = p.parse_args(argv)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    server: Optional[ServerProcess] = None
    target = args.target
    if target is None:
        Path(args.state_dir).mkdir(parents=True, exist_ok=True)
        server = ServerProcess(args.state_dir, log_path=str(Path(args.state_dir) / "server.log")).start()
        target = server.target
        print(f"regulator serving on {target} (state {args.state_dir}/, log {args.state_dir}/server.log)", flush=True)
    jobs = [
        {
            "views": tuple(args.views),
            "profile": prof,
            "seed": seed,
            "epochs": args.epochs,
            "job_id": f"demo-{stamp}-{prof}-s{seed}",
        }
        for seed in args.seeds
        for prof in args.profiles
    ]
    runs: list[dict[str, Any]] = []
    alone: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_job, target, cfg) for cfg in jobs]
            if not args.no_alone:
                futures += [pool.submit(_run_alone, v, s, args.epochs) for v in args.views for s in args.seeds]
            total = len(futures)
            for done, fut in enumerate(as_completed(futures), 1):
                res = fut.result()
                if isinstance(res, tuple):
                    view, seed, acc = res
                    alone.setdefault(view, []).append(acc)
                    print(f"[{done:2d}/{total}] {view} alone, seed {seed}: {100 * acc:.1f}%", flush=True)
                    continue
                runs.append(res)
                c = res["config"]
                heads = ", ".join(f"{v} {100 * a:.1f}%" for v, a in res["unimodal_acc"].items())
                print(
                    f"[{done:2d}/{total}] {c['profile']:8s} seed {c['seed']}: fused {100 * res['fused_acc']:.2f}%, "
                    f"heads {heads}, windows open {res['window_open_epochs']} epochs ({res['wall_s']:.1f}s)",
                    flush=True,
                )
    finally:
        if server is not None:
            code = server.stop()
            print(f"regulator stopped (exit code {code})", flush=True)
    summary = summarize(runs, alone, args.views, args.profiles)
    table = format_table(summary, args.views)
    print(f"\nUCI digits, views {' + '.join(args.views)}, {len(args.seeds)} seeds, {args.epochs} epochs (test accuracy, mean ± std)\n")
    print(table)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s; every number is in {args.out}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target": target, "runs": runs, "summary": summary, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
