"""Mixed precision: the hook under torch.autocast (bf16, and fp16 with a GradScaler) on CPU.

torch 2.13 runs CPU autocast in both float16 and bfloat16 (convolutions and linear layers in the
low precision, accumulation in float32) and ``torch.amp.GradScaler("cpu")``; the hook's contract
is the same as on a GPU: its statistics and the proximal term see unscaled gradients, and a step
the scaler skips (inf/NaN) is neither regulated, reported nor counted.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import pytest
import torch
from torch import nn

from regulator_client import RegulatorClient
from regulator_client.hook import InfoRegHook

from .test_hook import TwoModalNet, batch, brute_fisher, float32_bound

STEPS = 6
# fp16 keeps 11 significant bits (u = 2^-11 = 4.9e-4). Autocast rounds the input and the output
# of every convolution and linear layer to fp16 in the forward and in the backward pass (the
# products accumulate in fp32): through the 3 such layers per encoder of TwoModalNet, a
# gradient element carries on the order of 10-20 such roundings, its square twice that, and six
# SGD steps let the weights drift apart by as much again. 50 units of fp16 rounding (2.5%) bounds
# that; the errors this test exists for are of another order: gradients still scaled by the
# GradScaler's 2^16 give Fisher values 2^32 = 4e9 times too large, and a skipped step that is
# counted shifts every later step's number and value.
FP16_REL = 50 * 2.0**-11
# bf16 keeps 8 significant bits (u = 2^-8): the same count of roundings, in units of 2^-8, for
# the first step (before the weights drift apart).
BF16_REL = 50 * 2.0**-8


def train(precision: Optional[str], *, init_scale: float = 2.0**16, unscale_first: bool = False,
          job: str = "amp", check: bool = False) -> tuple[InfoRegHook, RegulatorClient, list[Any], torch.amp.GradScaler]:
    torch.manual_seed(0)
    model = TwoModalNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=precision == "fp16")
    client = RegulatorClient.in_process()
    hook = InfoRegHook(client, {"audio": model.audio, "visual": model.visual}, job_id=job, attempt=0,
                       profile="official", keep_history=True,
                       grad_scaler=scaler if precision == "fp16" else None, optimizer=opt if precision == "fp16" else None)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision or "")
    results = []
    hook.open()
    hook.on_epoch_start(0)
    for s in range(STEPS):
        a, v, y = batch(s)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            fused, uni = model(a, v)
            loss = nn.functional.cross_entropy(fused, y)
        hook.after_forward(logits=uni, labels=y)
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(opt)  # e.g. to clip; the hook sees it was done
        results.append(hook.after_backward())
        if check:  # the value of exactly the gradients the optimizer gets, as in test_hook
            for name, enc in (("audio", model.audio), ("visual", model.visual)):
                assert results[-1].fisher[name] == pytest.approx(brute_fisher(enc), rel=float32_bound(model))
        scaler.step(opt)
        scaler.update()
    hook.on_epoch_end()
    return hook, client, results, scaler


def recorded(client: RegulatorClient, job: str = "amp") -> list[list[float]]:
    return [[m.fisher for m in s.modalities] for s in client.get_session(job, include_steps=True).steps]


@pytest.mark.parametrize("unscale_first", [False, True])
def test_fp16_with_grad_scaler_records_the_fp32_fisher_values(unscale_first: bool) -> None:
    _, ref_client, ref, _ = train(None)
    hook, client, res, scaler = train("fp16", unscale_first=unscale_first)
    assert scaler.get_scale() == 2.0**16  # no step skipped: the gradients really were scaled by 2^16
    assert not any(r.skipped for r in res)
    want, got = recorded(ref_client), recorded(client)
    assert len(got) == len(want) == STEPS
    for w, g in zip(want, got):
        assert g == pytest.approx(w, rel=FP16_REL)
    worst = max(abs(a - b) / abs(b) for w, g in zip(want, got) for a, b in zip(g, w) if b)
    print(f"fp16 + GradScaler vs fp32: largest relative difference of a recorded Fisher value {worst:.2%}")
    # and the proximal coefficients, which depend on the scores, agree as closely
    for r0, r1 in zip(ref, res):
        assert list(r1.proximal.values()) == pytest.approx(list(r0.proximal.values()), rel=FP16_REL)
    assert any(v > 0 for r in res for v in r.proximal.values())


def test_steps_the_scaler_skips_are_neither_regulated_nor_reported() -> None:
    # 2^40 overflows fp16 in the backward pass: the scaler skips steps and halves its scale until
    # the gradients are finite again
    hook, client, res, scaler = train("fp16", init_scale=2.0**40, job="skips")
    skipped = [i for i, r in enumerate(res) if r.skipped]
    assert skipped and skipped == list(range(len(skipped))), skipped  # the first ones, while the scale is too high
    assert scaler.get_scale() == 2.0 ** (40 - len(skipped))  # the scaler skipped exactly those
    done = STEPS - len(skipped)
    assert hook.step == done and hook.timings.skipped == len(skipped) and hook.timings.steps == done
    assert [r.step for r in res if not r.skipped] == list(range(done))  # numbered without gaps
    detail = client.get_session("skips", include_steps=True)
    assert [s.step for s in detail.steps] == list(range(done))
    assert detail.epochs[0].steps == done
    assert all(math.isfinite(f) for step in recorded(client, "skips") for f in step)
    assert all(r.proximal == {"audio": 0.0, "visual": 0.0} and r.fisher == {} for r in res if r.skipped)


def test_bf16_autocast_needs_no_scaler_and_measures_the_gradients_it_gets() -> None:
    """bf16 gradients are not fp32's (8 significant bits), and where the proximal term nearly
    cancels the gradient (g + a*d with a ~ 1) the difference grows with the weights' drift: at the
    first step (no drift yet: d = 0) the values agree within the bf16 tolerance; at every step
    the hook's value is the Fisher value of the gradient the optimizer is handed."""
    _, ref_client, _, _ = train(None)
    hook, client, res, _ = train("bf16", check=True)
    assert recorded(client)[0] == pytest.approx(recorded(ref_client)[0], rel=BF16_REL)
    assert len(res) == STEPS and not any(r.skipped for r in res)
    assert [list(r.fisher.values()) for r in res] == recorded(client)


def test_a_scaler_step_before_the_hook_is_refused() -> None:
    torch.manual_seed(0)
    model = TwoModalNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="optimizer"):
        InfoRegHook(RegulatorClient.in_process(), {"audio": model.audio, "visual": model.visual}, job_id="x", grad_scaler=scaler)
    hook = InfoRegHook(RegulatorClient.in_process(), {"audio": model.audio, "visual": model.visual}, job_id="order",
                       attempt=0, grad_scaler=scaler, optimizer=opt)
    hook.open()
    hook.on_epoch_start(0)
    a, v, y = batch(0)
    with torch.autocast("cpu", dtype=torch.float16):
        fused, uni = model(a, v)
        loss = nn.functional.cross_entropy(fused, y)
    hook.after_forward(logits=uni, labels=y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="before after_backward"):
        hook.after_backward()
