"""The science table: every profile on several view pairs of the digits data, paired by seed.

    python -m trainers.bench_science --out results/science.json          # (make bench-science)
    python -m trainers.bench_science --seeds 0 1 --epochs 10 --sets fac+zer   # a quick look

Starts one ``regulator serve`` and trains the digits job through it (two jobs at a time) for
each view set x profile x loss (fused only, or fused + unimodal losses: the released InfoReg
code's InfoReg*) x seed; a profile runs only on view sets it supports (``official``: exactly two
modalities). Prints, per view set and loss, the fused accuracy, each view's head accuracy inside
the fused model, the epochs with each view's window open and the steps that slowed it, then the
paired differences to ``none`` (same seed, same data order) with the number of seeds that
improved. Every run is appended to ``<out>.runs.jsonl`` as it finishes; ``--resume`` skips the
runs already there, so an interrupted table continues where it stopped.
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

from regulator_service.policy import BUILTIN_PROFILES

from .serverproc import ServerProcess

VIEW_SETS = ("fac+zer", "pix+mor", "kar+fou", "fac+fou+mor")
PROFILES = ("none", "official", "paper", "ogm-ge")
LOSSES = ("fused", "fused+unimodal")


def supports(profile: str, n_views: int) -> bool:
    """From the profile's own modality rules (the registry), not a list kept here."""
    spec = BUILTIN_PROFILES.get(profile)
    return spec.min_modalities <= n_views and (spec.max_modalities is None or n_views <= spec.max_modalities)


def run_key(views: Sequence[str], profile: str, loss: str, seed: int) -> str:
    return f"{'+'.join(views)}|{profile}|{loss}|{seed}"


def _run_job(target: str, cfg: dict[str, Any]) -> dict[str, Any]:
    from regulator_client import RegulatorClient

    from .digits import TrainConfig, train

    with RegulatorClient.connect(target) as client:
        result = train(TrainConfig(**cfg), client)
    keep = ("job_id", "fused_acc", "unimodal_acc", "window_open_epochs", "regulated_steps", "wall_s", "fallback_steps")
    return {**{k: result[k] for k in keep}, "steps": len(result["applied"])}


def plan(sets: Sequence[str], profiles: Sequence[str], losses: Sequence[str], seeds: Sequence[int], epochs: int, stamp: str) -> list[dict[str, Any]]:
    jobs = []
    for vs in sets:
        views = tuple(vs.split("+"))
        for loss in losses:
            for seed in seeds:
                for prof in profiles:
                    if not supports(prof, len(views)):
                        continue
                    jobs.append({
                        "views": views,
                        "profile": prof,
                        "seed": seed,
                        "epochs": epochs,
                        "unimodal_loss": loss == "fused+unimodal",
                        "job_id": f"science-{stamp}-{vs}-{prof}-{'uni' if loss != 'fused' else 'fused'}-s{seed}",
                    })
    return jobs


def _loss(cfg: dict[str, Any]) -> str:
    return "fused+unimodal" if cfg["unimodal_loss"] else "fused"


def _ms(xs: Sequence[float]) -> str:
    xs = [100 * x for x in xs]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):5.1f} ±{sd:4.1f}"


def _diff(xs: Sequence[float], base: Sequence[float]) -> tuple[float, int, int]:
    d = [100 * (a - b) for a, b in zip(xs, base)]
    return statistics.mean(d), sum(x > 0 for x in d), len(d)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One block per (view set, loss): per profile the per-seed numbers (sorted by seed), and the
    paired differences to ``none`` over the seeds both have."""
    blocks: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for r in runs:
        c = r["config"]
        blocks.setdefault(("+".join(c["views"]), _loss(c)), {}).setdefault(c["profile"], []).append(r)
    out = []
    for (vs, loss), by_profile in blocks.items():
        views = vs.split("+")
        block: dict[str, Any] = {"views": views, "loss": loss, "profiles": {}}
        base = {r["config"]["seed"]: r for r in by_profile.get("none", [])}
        for prof in [p for p in PROFILES if p in by_profile] + sorted(set(by_profile) - set(PROFILES)):
            rs = sorted(by_profile[prof], key=lambda r: r["config"]["seed"])
            entry: dict[str, Any] = {
                "seeds": [r["config"]["seed"] for r in rs],
                "fused_acc": [r["fused_acc"] for r in rs],
                "head_acc": {v: [r["unimodal_acc"][v] for r in rs] for v in views},
                "window_open_epochs": {v: [r["window_open_epochs"].get(v, 0) for r in rs] for v in views},
                "slowed_steps": {v: [r["regulated_steps"].get(v, 0) for r in rs] for v in views},
                "wall_s": [r["wall_s"] for r in rs],
                "steps": max(r.get("steps", 0) for r in rs),
            }
            paired = [r for r in rs if r["config"]["seed"] in base]
            if prof != "none" and paired:
                b = [base[r["config"]["seed"]] for r in paired]
                entry["vs_none"] = {
                    "pairs": len(paired),
                    "fused": _diff([r["fused_acc"] for r in paired], [x["fused_acc"] for x in b]),
                    "head": {v: _diff([r["unimodal_acc"][v] for r in paired], [x["unimodal_acc"][v] for x in b]) for v in views},
                }
            block["profiles"][prof] = entry
        out.append(block)
    return out


def format_tables(blocks: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for b in blocks:
        views = b["views"]
        n = max(len(e["seeds"]) for e in b["profiles"].values())
        lines.append(f"\n{' + '.join(views)}, loss {b['loss']}, {n} seeds (test accuracy %, mean ± std over seeds)")
        head = f"{'profile':10s} | {'fused':>11s} | " + " | ".join(f"{v + ' head':>11s}" for v in views)
        head += " | " + " | ".join(f"{v + ' win/slow':>14s}" for v in views)
        lines += [head, "-" * len(head)]
        for prof, e in b["profiles"].items():
            row = f"{prof:10s} | {_ms(e['fused_acc']):>11s} | " + " | ".join(f"{_ms(e['head_acc'][v]):>11s}" for v in views)
            row += " | " + " | ".join(
                f"{statistics.mean(e['window_open_epochs'][v]):5.1f}/{statistics.mean(e['slowed_steps'][v]):7.0f}" for v in views
            )
            lines.append(row)
        diffs = [(p, e["vs_none"]) for p, e in b["profiles"].items() if "vs_none" in e]
        for prof, d in diffs:
            cell = lambda t: f"{t[0]:+5.1f} {t[1]:2d}/{t[2]}"  # noqa: E731
            lines.append(f"{'Δ ' + prof:10s} | {cell(d['fused']):>11s} | " + " | ".join(f"{cell(d['head'][v]):>11s}" for v in views))
    steps = max((e["steps"] for b in blocks for e in b["profiles"].values()), default=0)
    lines.append(
        "\nΔ X: X minus none, paired by seed, in points, and the seeds where X is higher. win/slow: mean "
        "epochs with the view's window open / mean steps that regulated the view (a proximal term, or "
        f"a gradient scale other than 1){f'; {steps} steps per run' if steps else ''}"
    )
    return "\n".join(lines)


def read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.bench_science", description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=list(VIEW_SETS), help="view sets, views joined by '+' (default: %(default)s)")
    p.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=BUILTIN_PROFILES.names())
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--workers", type=int, default=2, help="training jobs at a time (default 2: both cores)")
    p.add_argument("--target", default=None, help="use this running regulator instead of starting one")
    p.add_argument("--state-dir", default=None, help="state directory of the started regulator (default: in memory)")
    p.add_argument("--out", default="results/science.json")
    p.add_argument("--resume", action="store_true", help="skip the runs already in <out>.runs.jsonl")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs_path = out.with_suffix(".runs.jsonl")
    previous = read_runs(runs_path) if args.resume else []
    if not args.resume:
        runs_path.write_text("")
    done_keys = {run_key(r["config"]["views"], r["config"]["profile"], _loss(r["config"]), r["config"]["seed"]) for r in previous}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    jobs = [
        j for j in plan(args.sets, args.profiles, args.losses, args.seeds, args.epochs, stamp)
        if run_key(j["views"], j["profile"], _loss(j), j["seed"]) not in done_keys
    ]
    server: Optional[ServerProcess] = None
    target = args.target
    if target is None:
        server = ServerProcess(args.state_dir).start()
        target = server.target
    print(f"regulator on {target}; {len(jobs)} runs to do ({len(previous)} resumed), {args.workers} at a time", flush=True)
    runs = list(previous)
    failed: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_job, target, cfg): cfg for cfg in jobs}
            for done, fut in enumerate(as_completed(futures), 1):
                cfg = futures[fut]
                try:
                    res = {"config": {**cfg, "views": list(cfg["views"])}, **fut.result()}
                except Exception as exc:  # one broken run must not cost the table: report it, go on
                    failed.append((cfg["job_id"], f"{type(exc).__name__}: {exc}"))
                    print(f"[{done:3d}/{len(jobs)}] {cfg['job_id']} FAILED: {failed[-1][1]}", flush=True)
                    continue
                runs.append(res)
                with runs_path.open("a") as fh:
                    fh.write(json.dumps(res) + "\n")
                elapsed = time.perf_counter() - t0
                eta = elapsed / done * (len(jobs) - done)
                heads = " ".join(f"{v} {100 * a:.1f}" for v, a in res["unimodal_acc"].items())
                print(
                    f"[{done:3d}/{len(jobs)}] {'+'.join(cfg['views']):11s} {cfg['profile']:8s} {_loss(cfg):14s} seed {cfg['seed']}: "
                    f"fused {100 * res['fused_acc']:.1f}, heads {heads} ({res['wall_s']:.0f}s; eta {eta / 60:.0f} min)",
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()
    blocks = summarize(runs)
    table = format_tables(blocks)
    wall = time.perf_counter() - t0
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(table)
    print(f"\n{len(jobs)} runs in {wall / 60:.1f} min ({when}); every number is in {out} and {runs_path}")
    out.write_text(json.dumps({"when": when, "wall_s": wall, "epochs": args.epochs, "blocks": blocks, "table": table, "failed": failed}, indent=2))
    if failed:
        print(f"{len(failed)} run(s) FAILED (rerun with --resume to retry only those): {[j for j, _ in failed]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
