"""The regulation in TensorBoard: a tiny two-view job writes ``hook.metrics()`` through
``torch.utils.tensorboard.SummaryWriter`` every step, then reads the event file back.

    python examples/tensorboard_metrics.py runs/inforeg-demo      # then: tensorboard --logdir runs

Talks to ``REGULATOR_TARGET`` when it is set, else to an in-process regulator. Needs torch and
tensorboard (``pip install '.[torch]' tensorboard``).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from regulator_client import RegulatorClient
from regulator_client.heads import concat_unimodal_logits
from regulator_client.hook import InfoRegHook

CLASSES, N, BATCH, EPOCHS = 4, 96, 16, 4


def main(logdir: str) -> None:
    torch.manual_seed(0)
    y = torch.randint(0, CLASSES, (N,))
    centres = torch.randn(CLASSES, 8)
    views = {"a": centres[y] + 0.3 * torch.randn(N, 8), "b": 0.2 * centres[y] + torch.randn(N, 8)}  # a strong, b weak
    encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(8, 16), nn.ReLU()) for m in views})
    head = nn.Linear(32, CLASSES)
    opt = torch.optim.SGD([*encoders.parameters(), *head.parameters()], lr=0.1, momentum=0.9)

    target = os.environ.get("REGULATOR_TARGET")
    client = RegulatorClient.connect(target) if target else RegulatorClient.in_process()
    writer = SummaryWriter(logdir)
    hook = InfoRegHook(client, dict(encoders), job_id="tensorboard-demo", profile="official", profile_params={"history": 2})
    step = 0
    with hook:
        for epoch in range(EPOCHS):
            hook.on_epoch_start(epoch)
            for s in range(0, N, BATCH):
                feats = {m: encoders[m](x[s : s + BATCH]) for m, x in views.items()}
                fused = head(torch.cat([feats["a"], feats["b"]], 1))
                opt.zero_grad()
                hook.after_forward(logits=concat_unimodal_logits(head, feats), labels=y[s : s + BATCH])
                F.cross_entropy(fused, y[s : s + BATCH]).backward()
                hook.after_backward()
                opt.step()
                step += 1
                for key, value in hook.metrics().items():  # per step: host values, no extra sync
                    writer.add_scalar(key, value, step)
            hook.on_epoch_end()
            for key, value in hook.metrics().items():  # the closed epoch's Fisher traces and windows
                writer.add_scalar(key, value, step)
    writer.close()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = sorted(acc.Tags()["scalars"])
    print(f"{len(tags)} scalar tags in {logdir}")
    at_epoch_end = {e.step: e.value for e in acc.Scalars("inforeg/a/window_open") if e.step % (N // BATCH) == 0}
    print("inforeg/a/window_open at each epoch's end:", *(int(v) for _, v in sorted(at_epoch_end.items())))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/inforeg-demo")
