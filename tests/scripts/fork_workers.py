"""Fork-safety check, run as its own process by tests/test_ddp.py.

The client talks to the regulator (its channel and gRPC threads are live), then a DataLoader
forks two workers, and each worker uses the *inherited* client object: it must open its own
channel instead of touching the parent's (grpc/grpc#32992). Training continues through the hook.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from regulator_client import RegulatorClient
from regulator_client.hook import InfoRegHook

client = RegulatorClient.connect(sys.argv[1], timeout=10)
client.list_sessions()  # the parent's channel is up before the fork


class Probe(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        g = torch.Generator().manual_seed(i)
        return torch.randn(5, generator=g), torch.randn(3, generator=g), i % 2


def worker_init(worker_id: int) -> None:
    sessions = client.list_sessions()  # a call from the forked child, through the inherited object
    print(f"worker {worker_id} pid {os.getpid()} sees {len(sessions)} session(s)", flush=True)


enc = {"a": nn.Linear(5, 2), "b": nn.Linear(3, 2)}
opt = torch.optim.SGD([p for m in enc.values() for p in m.parameters()], lr=0.1)
hook = InfoRegHook(client, enc, job_id="fork-safety", profile="official")
loader = DataLoader(Probe(), batch_size=8, num_workers=2, multiprocessing_context="fork", worker_init_fn=worker_init)
with hook:
    for epoch in range(2):
        hook.on_epoch_start(epoch)
        for xa, xb, y in loader:
            opt.zero_grad()
            logits = {"a": enc["a"](xa), "b": enc["b"](xb)}
            sum(nn.functional.cross_entropy(v, y) for v in logits.values()).backward()
            hook.after_backward(logits=logits, labels=y)
            opt.step()
        hook.on_epoch_end()
print(f"done: {hook.step} steps in the parent pid {os.getpid()}", flush=True)
