"""The hook's step exchange (``client/step_exchange.py``): the Fisher values a step hands to the
next step's Report survive a step that is never reported.

A step's Fisher values travel with the next Report. When the next step is one the GradScaler
skips (fp16, inf/NaN in the gradients), that step sends nothing, so the values must wait for the
step after it: the regulator's record of every reported step then holds exactly the value the
hook measured for it, and no value is lost or given to another step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from regulator_client import RegulatorClient
from regulator_client.hook import InfoRegHook

from .test_hook import TwoModalNet, batch

STEPS = 6
POISONED = 3  # the step whose gradient gets an inf: the scaler skips it


def test_a_skipped_step_in_the_middle_keeps_the_previous_steps_fisher_values() -> None:
    torch.manual_seed(0)
    model = TwoModalNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    client = RegulatorClient.in_process()
    hook = InfoRegHook(client, {"audio": model.audio, "visual": model.visual}, job_id="mid-skip", attempt=0,
                       profile="official", keep_history=True, grad_scaler=scaler, optimizer=opt)
    results = []
    with hook:
        hook.on_epoch_start(0)
        for s in range(STEPS):
            a, v, y = batch(s)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                fused, uni = model(a, v)
                loss = nn.functional.cross_entropy(fused, y)
            hook.after_forward(logits=uni, labels=y)
            scaler.scale(loss).backward()
            if s == POISONED:
                next(model.audio.parameters()).grad.view(-1)[0] = math.inf
            results.append(hook.after_backward())
            scaler.step(opt)
            scaler.update()
        hook.on_epoch_end()
        steps = client.get_session("mid-skip", include_steps=True).steps
    assert [r.skipped for r in results] == [s == POISONED for s in range(STEPS)]
    reported = [r for r in results if not r.skipped]
    assert [s.step for s in steps] == [r.step for r in reported] == list(range(STEPS - 1))
    # the value measured for the step before the skipped one reached the regulator with a later Report
    assert [[m.fisher for m in s.modalities] for s in steps] == [list(r.fisher.values()) for r in reported]
    assert all(math.isfinite(m.fisher) and m.fisher > 0 for s in steps for m in s.modalities)
