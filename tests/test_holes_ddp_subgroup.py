"""A DDP job whose ``process_group`` leaves out global rank 0.

Three gloo processes on the CPU; the job runs on global ranks {1, 2} (``dist.new_group([1, 2])``)
and rank 0 does not train. The job's leader is its group's rank 0, global rank 1: it reports, and
the other rank takes each step's answer from it. Every job rank must apply the same factors, and
the regulator must record the same history as a single process training the same model.

Exact equality is by construction, not tolerance: both job ranks train on the same batches (DDP
averages two identical gradients, which is exact), and each passes half of the step's scores and
count (dyadic values, so the leader's sum is exact); the single process passes the whole."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from regulator_client import InfoRegHook, RegulatorClient

pytestmark = pytest.mark.e2e

CLASSES, BATCH, EPOCHS, STEPS = 3, 8, 2, 4
JOB_RANKS = [1, 2]


class TwoEncoders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.audio = nn.Linear(5, CLASSES)
        self.visual = nn.Linear(5, CLASSES)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.audio(audio) + self.visual(visual)


def batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 5, generator=g), torch.randn(BATCH, 5, generator=g),
             torch.randint(0, CLASSES, (BATCH,), generator=g)) for _ in range(STEPS)]


def job_scores(step: int) -> dict[str, float]:
    """The step's score sums for the whole job (multiples of 1/2: their halves add up exactly);
    the leading modality changes from step to step."""
    return {"audio": 1.0 + step % 3, "visual": 1.0 + (step + 1) % 3}


def train(model: nn.Module, hook: InfoRegHook, share: int) -> None:
    """``share``: how many processes share each step's scores and count."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    step = 0
    for epoch in range(EPOCHS):
        hook.on_epoch_start(epoch)
        for audio, visual, labels in batches():
            opt.zero_grad()
            nn.functional.cross_entropy(model(audio, visual), labels).backward()
            scores = {m: s / share for m, s in job_scores(step).items()}
            hook.after_backward(scores=scores, count=BATCH // share)
            opt.step()
            step += 1
        hook.on_epoch_end()


def rank_main(rank: int, world: int, init: str, target: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    group = dist.new_group(JOB_RANKS)  # every process of the world takes part in making it
    if rank in JOB_RANKS:
        ddp = nn.parallel.DistributedDataParallel(TwoEncoders(), process_group=group)
        inner: Any = ddp.module
        with RegulatorClient.connect(target, timeout=60.0) as client:
            hook = InfoRegHook(client, {"audio": inner.audio, "visual": inner.visual}, job_id="subgroup",
                               rank=dist.get_rank(group), world_size=len(JOB_RANKS), process_group=group,
                               profile="official", keep_history=True)
            train(ddp, hook, share=len(JOB_RANKS))
            hook.close()
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "proximal": [r.proximal for r in hook.history],
            "reports": hook.reports,
            "weights": {k: v.tolist() for k, v in inner.state_dict().items()},
        }))
    dist.barrier()  # rank 0 waits here for the job
    dist.destroy_process_group()


def history(client: RegulatorClient, job: str) -> tuple[list[bytes], list[bytes]]:
    detail = client.get_session(job, include_steps=True)
    return ([e.SerializeToString(deterministic=True) for e in detail.epochs],
            [s.SerializeToString(deterministic=True) for s in detail.steps])


def test_a_job_whose_group_excludes_global_rank_0_equals_a_single_process(
    tmp_path: Path, server: Any, client: RegulatorClient
) -> None:
    mp.spawn(rank_main, args=(3, f"file://{tmp_path / 'rendezvous'}", server.target, str(tmp_path)), nprocs=3, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in JOB_RANKS]
    assert [r["reports"] for r in ranks] == [True, False]  # the leader is global rank 1
    assert ranks[0]["proximal"] == ranks[1]["proximal"]  # the same factors on every job rank
    assert len(ranks[0]["proximal"]) == EPOCHS * STEPS
    assert any(v > 0.0 for p in ranks[0]["proximal"] for v in p.values())  # regulation did happen
    model = TwoEncoders()
    single = copy.deepcopy(model)
    hook = InfoRegHook(client, {"audio": single.audio, "visual": single.visual}, job_id="single",
                       profile="official", keep_history=True)
    train(single, hook, share=1)
    hook.close()
    assert [r.proximal for r in hook.history] == ranks[0]["proximal"]
    assert history(client, "subgroup") == history(client, "single")  # scores, Fisher values, windows
    weights = {k: v.tolist() for k, v in single.state_dict().items()}
    assert ranks[0]["weights"] == weights and ranks[1]["weights"] == weights
