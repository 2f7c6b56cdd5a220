"""Measures how far a 2-rank DDP run drifts from the single-process run on the same data order.

    python tests/scripts/ddp_drift.py --seeds 0 1 2 3 4 5 6 7 8 9 --epochs 3

The two runs differ only in float32 summation order (2 x 32 gradients all-reduced vs one batch
of 64), so their coefficients and weights agree to a few ulps at first and then drift apart as
the differences feed back through the optimizer. How far depends on the CPU's kernels, which is
why ``tests/test_ddp.py`` uses the tolerance this script justifies, not one machine's figure.
Prints, per seed, the largest relative coefficient difference, the largest absolute weight
difference and the smallest score gap |s_ref - s_other| the regulated pattern depends on.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from regulator_client import RegulatorClient  # noqa: E402
from trainers.digits import TrainConfig, train  # noqa: E402
from trainers.serverproc import ServerProcess  # noqa: E402


def drift(seed: int, epochs: int, tmp: Path) -> dict[str, float]:
    with ServerProcess(None) as server:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "trainers.digits_ddp", "--target", server.target, "--job-id", f"ddp-{seed}",
               "--profile", "official", "--epochs", str(epochs), "--seed", str(seed),
               "--out", str(tmp / "ddp.json"), "--save-weights", str(tmp / "ddp.pt")]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        single = train(TrainConfig(job_id=f"single-{seed}", profile="official", epochs=epochs, seed=seed,
                                   save_weights=str(tmp / "single.pt")), RegulatorClient.connect(server.target))
    ddp = json.loads((tmp / "ddp.json").read_text())["applied"]
    rel = 0.0
    gap = math.inf
    for d, s in zip(ddp, single["applied"]):
        for a, b in zip(d, s):
            if a or b:
                rel = max(rel, abs(a - b) / max(abs(a), abs(b)))
                # official: beta = gain * exp(tanh(gap)) -> the gap the sign decision came from
                gain = 0.95 if a > 0.5 else 0.1
                gap = min(gap, math.atanh(min(math.log(max(a, b) / gain), 1 - 1e-16)))
    w_ddp, w_single = torch.load(tmp / "ddp.pt"), torch.load(tmp / "single.pt")
    weights = max((w_ddp[k] - w_single[k]).abs().max().item() for k in w_ddp)
    return {"seed": seed, "coef_rel": rel, "weights_abs": weights, "min_gap": gap}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            row = drift(seed, args.epochs, Path(tmp))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({
        "max_coef_rel": max(r["coef_rel"] for r in rows),
        "max_weights_abs": max(r["weights_abs"] for r in rows),
        "min_gap": min(r["min_gap"] for r in rows),
    }))


if __name__ == "__main__":
    main()
