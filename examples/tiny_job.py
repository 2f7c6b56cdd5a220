"""A tiny two-modality job that trains through the regulator at $REGULATOR_TARGET (default
127.0.0.1:50051) and prints what the regulation did; for trying the environment switches:

    REGULATOR_DISABLED=1 python examples/tiny_job.py
    REGULATOR_ON_UNAVAILABLE=neutral REGULATOR_TARGET=127.0.0.1:1 python examples/tiny_job.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from regulator_client import RegulatorClient
from regulator_client.heads import concat_unimodal_logits
from regulator_client.hook import InfoRegHook

torch.manual_seed(0)
encoders = nn.ModuleDict({"audio": nn.Linear(8, 16), "visual": nn.Linear(8, 16)})
head = nn.Linear(32, 4)
opt = torch.optim.SGD([*encoders.parameters(), *head.parameters()], lr=0.1)
client = RegulatorClient.connect(timeout=2.0)  # a short deadline per call, for the demonstration
hook = InfoRegHook(client, dict(encoders), job_id="tiny-job", keep_history=True)  # no profile: official
with hook:
    for epoch in range(2):
        hook.on_epoch_start(epoch)
        for step in range(2):
            y = torch.randint(0, 4, (16,))
            x = {"audio": torch.randn(16, 8) + y[:, None], "visual": torch.randn(16, 8)}  # audio knows the label
            feats = {m: torch.relu(encoders[m](x[m])) for m in encoders}
            hook.after_forward(logits=concat_unimodal_logits(head, feats), labels=y)
            F.cross_entropy(head(torch.cat(list(feats.values()), 1)), y).backward()
            hook.after_backward()
            opt.step()
            opt.zero_grad()
        hook.on_epoch_end()
h = hook.history
print(f"steps {len(h)}, answered {sum(bool(r.window) for r in h)}, fallback {sum(r.fallback for r in h)}, "
      f"regulated {sum(any(b > 0 for b in r.proximal.values()) for r in h)}")
