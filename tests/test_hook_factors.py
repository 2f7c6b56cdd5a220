"""The hook's three parts on their own and together: applying factors (proximal, OGM-GE scale
and noise) to exactly the selected tensors, the split after_forward/after_backward API, and the
one-Report-per-step contract with a real regulator."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.hook import InfoRegHook
from regulator_client.stats import NOISE_EPS, EncoderProbe, noise_seed

from .test_hook import TwoModalNet, batch


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def backward(model: TwoModalNet, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    a, v, y = batch(seed)
    model.zero_grad()
    fused, uni = model(a, v)
    nn.functional.cross_entropy(fused, y).backward()
    return fused, uni, y


def test_selectors_pick_the_released_codes_tensors_by_default() -> None:
    model = TwoModalNet()
    probe = EncoderProbe({"audio": model.audio, "visual": model.visual})
    names = {id(p): n for n, p in model.named_parameters()}
    picked = lambda idx: sorted(names[id(probe.params[i])] for i in idx)  # noqa: E731
    # InfoReg: every encoder parameter gets the proximal term; OGM-GE: only 4-D weights are scaled
    assert picked(probe.proximal_idx[0]) == sorted(n for n in names.values() if n.startswith("audio."))
    assert picked(probe.scale_idx[0]) == ["audio.conv.weight"]
    custom = EncoderProbe(
        {"audio": model.audio, "visual": model.visual},
        proximal_params={"visual": "weights"},
        scale_params={"audio": "all", "visual": lambda name, p: name.startswith("fc.")},
    )
    assert picked(custom.proximal_idx[0]) == picked(probe.proximal_idx[0])  # unnamed: the default
    assert picked(custom.proximal_idx[1]) == ["visual.conv.weight", "visual.conv2.weight", "visual.fc.weight"]
    assert picked(custom.scale_idx[0]) == picked(probe.proximal_idx[0])
    assert picked(custom.scale_idx[1]) == ["visual.fc.bias", "visual.fc.weight"]
    with pytest.raises(ValueError, match="unknown modalities"):
        EncoderProbe({"audio": model.audio, "visual": model.visual}, scale_params={"video": "all"})
    with pytest.raises(ValueError, match="parameter selector"):
        EncoderProbe({"audio": model.audio, "visual": model.visual}, scale_params="convs")


def test_scale_and_noise_follow_ogm_ge_on_the_selected_tensors_only() -> None:
    torch.manual_seed(0)
    model = TwoModalNet()
    probe = EncoderProbe({"audio": model.audio, "visual": model.visual}, scale_params={"audio": "all"})
    probe.snapshot()
    backward(model, 1)
    before = grads_of(model)
    seeds = lambda i: noise_seed("job", 7, i)  # noqa: E731
    # audio scaled with noise, visual scaled without noise, no proximal term
    probe.apply([0.0, 0.0], [0.25, 0.5], [1.0, 0.0], seeds)
    after = grads_of(model)
    gen = torch.Generator()
    for i, p in enumerate(probe.params):
        name = next(n for n, q in model.named_parameters() if q is p)
        g0 = before[name]
        if probe.owner[i] == 0:  # every audio tensor: g * k + N(0, std(g) + 1e-8)
            gen.manual_seed(seeds(i))
            std = g0.std() if g0.numel() > 1 else torch.zeros(())
            want = g0 * 0.25 + torch.randn(g0.shape, generator=gen) * (std + NOISE_EPS)
            torch.testing.assert_close(after[name], want, rtol=1e-6, atol=1e-7)
            assert not torch.equal(after[name], g0 * 0.25)  # the noise is there
        elif i in probe.scale_idx[1]:  # visual's 4-D weight: scaled, no noise
            torch.testing.assert_close(after[name], g0 * 0.5)
        else:
            assert torch.equal(after[name], g0)
    assert torch.equal(after["head.weight"], before["head.weight"])


def test_noise_is_the_same_for_the_same_job_step_and_tensor_and_leaves_the_global_rng_alone() -> None:
    def noisy(job: str, step: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = TwoModalNet()
        probe = EncoderProbe({"audio": model.audio, "visual": model.visual}, scale_params="all")
        backward(model, 1)
        probe.apply([0.0, 0.0], [1.0, 1.0], [1.0, 1.0], lambda i: noise_seed(job, step, i))
        return grads_of(model)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c, d = noisy("j", 3), noisy("j", 3), noisy("j", 4), noisy("k", 3)
    assert all(torch.equal(a[n], b[n]) for n in a)  # what two DDP ranks draw
    assert not torch.equal(a["audio.conv.weight"], c["audio.conv.weight"])
    assert not torch.equal(a["audio.conv.weight"], d["audio.conv.weight"])
    torch.manual_seed(123)
    assert torch.equal(torch.get_rng_state(), state)


def test_neutral_factors_touch_nothing() -> None:
    model = TwoModalNet()
    probe = EncoderProbe({"audio": model.audio, "visual": model.visual}, scale_params="all")
    probe.snapshot()
    backward(model, 2)
    before = grads_of(model)
    probe.apply([0.0, 0.0], [1.0, 1.0], [0.0, 0.0])
    assert all(torch.equal(v, grads_of(model)[n]) for n, v in before.items())


def run_hook(split: bool, seeds: range, **options: Any) -> tuple[InfoRegHook, RegulatorClient, TwoModalNet]:
    torch.manual_seed(5)
    model = TwoModalNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    client = RegulatorClient.in_process()
    hook = InfoRegHook(client, {"audio": model.audio, "visual": model.visual}, job_id="split", attempt=0,
                       keep_history=True, **options)
    hook.open()
    for epoch, chunk in enumerate((seeds[: len(seeds) // 2], seeds[len(seeds) // 2 :])):
        hook.on_epoch_start(epoch)
        for s in chunk:
            a, v, y = batch(s)
            opt.zero_grad()
            fused, uni = model(a, v)
            if split:
                hook.after_forward(logits=uni, labels=y)
                nn.functional.cross_entropy(fused, y).backward()
                hook.after_backward()
            else:
                nn.functional.cross_entropy(fused, y).backward()
                hook.after_backward(logits=uni, labels=y)
            opt.step()
        hook.on_epoch_end()
    return hook, client, model


def history_bytes(client: RegulatorClient, job: str) -> bytes:
    detail = client.get_session(job, include_steps=True)
    detail.session.created_unix_ms = detail.session.last_active_unix_ms = 0
    return detail.SerializeToString(deterministic=True)


@pytest.mark.parametrize("profile", ["official", "ogm-ge"])
def test_the_split_api_equals_the_single_call_bit_for_bit(profile: str) -> None:
    """after_forward + after_backward (the report overlapping backward) changes when the report
    leaves, nothing else: same factors, same recorded history, same weights."""
    options: dict[str, Any] = {"profile": profile}
    if profile == "ogm-ge":
        options["scale_params"] = "all"  # TwoModalNet has one 4-D tensor per encoder
    split, c1, m1 = run_hook(True, range(10), **options)
    single, c2, m2 = run_hook(False, range(10), **options)
    assert [(r.proximal, r.grad_scale, r.noise_scale, r.fisher) for r in split.history] == [
        (r.proximal, r.grad_scale, r.noise_scale, r.fisher) for r in single.history]
    assert history_bytes(c1, "split") == history_bytes(c2, "split")
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    if profile == "official":
        assert any(v > 0 for r in split.history for v in r.proximal.values())
    else:
        assert any(v < 1 for r in split.history for v in r.grad_scale.values())
        assert all(v in (0.0, 1.0) for r in split.history for v in r.noise_scale.values())


def test_ogm_ge_factors_reach_the_gradients_as_answered() -> None:
    torch.manual_seed(3)
    model = TwoModalNet()
    client = RegulatorClient.in_process()
    hook = InfoRegHook(client, {"audio": model.audio, "visual": model.visual}, job_id="ogm", attempt=0,
                       profile="ogm-ge", profile_params={"alpha": 0.8})
    hook.open()
    hook.on_epoch_start(0)
    slowed = 0
    for s in range(6):
        fused, uni, y = backward(model, s)
        hook.after_forward(logits=uni, labels=y)
        before = grads_of(model)
        res = hook.after_backward()
        after = grads_of(model)
        scores = [float(torch.softmax(uni[m].detach(), 1).gather(1, y.view(-1, 1)).double().sum()) for m in ("audio", "visual")]
        for i, m in enumerate(("audio", "visual")):
            other = scores[1 - i]
            ratio = scores[i] / other
            k = 1 - math.tanh(0.8 * max(ratio, 0.0)) if ratio > 1 else 1.0
            assert res.grad_scale[m] == pytest.approx(k, rel=1e-12)
            slowed += k < 1
            name = f"{m}.conv.weight"  # the only 4-D tensor: scaled, with noise of std(grad)
            p_index = next(j for j, p in enumerate(hook.probe.params) if p is dict(model.named_parameters())[name])
            gen = torch.Generator().manual_seed(noise_seed("ogm", s, p_index))
            want = before[name] * k + torch.randn(before[name].shape, generator=gen) * (before[name].std() + NOISE_EPS)
            torch.testing.assert_close(after[name], want, rtol=1e-6, atol=1e-7)
            assert torch.equal(after[f"{m}.fc.weight"], before[f"{m}.fc.weight"])  # not 4-D: untouched
    assert slowed >= 3  # one of the two is ahead at almost every step
    hook.on_epoch_end()
    hook.close()


class Counting:
    """A transport that counts the requests a hook sends."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reports: list[pb.ReportRequest] = []
        self.ends: list[pb.EndEpochRequest] = []

    def report(self, req: pb.ReportRequest, **call: Any) -> pb.ReportResponse:
        self.reports.append(req)
        return self.inner.report(req, **call)

    def end_epoch(self, req: pb.EndEpochRequest, **call: Any) -> pb.EndEpochResponse:
        self.ends.append(req)
        return self.inner.end_epoch(req, **call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_each_step_is_one_report_with_the_previous_steps_fisher_values() -> None:
    torch.manual_seed(0)
    model = TwoModalNet()
    counting = Counting(RegulatorClient.in_process().transport)
    client = RegulatorClient(counting)
    hook = InfoRegHook(client, {"audio": model.audio, "visual": model.visual}, job_id="one", attempt=0,
                       profile="official", keep_history=True)
    with hook:
        for epoch in range(2):
            hook.on_epoch_start(epoch)
            for s in range(3):
                fused, uni, y = backward(model, 3 * epoch + s)
                hook.after_backward(logits=uni, labels=y)
            hook.on_epoch_end()
    assert [r.step for r in counting.reports] == list(range(6))
    assert all(all(s.WhichOneof("fisher_source") == "fisher_deferred" for s in r.stats) for r in counting.reports)
    # each report carries the previous step's values, except the first of an epoch (the EndEpoch did)
    assert [[m.step for m in r.measured] for r in counting.reports] == [[], [0], [1], [], [3], [4]]
    assert [e.measured.step for e in counting.ends] == [2, 5]
    sent = {m.step: [x.fisher for x in m.modalities] for r in counting.reports for m in r.measured}
    sent.update({e.measured.step: [x.fisher for x in e.measured.modalities] for e in counting.ends})
    assert [sent[r.step] for r in hook.history] == [list(r.fisher.values()) for r in hook.history]


def test_misuse_of_the_split_api_is_refused() -> None:
    model = TwoModalNet()
    hook = InfoRegHook(RegulatorClient.in_process(), {"audio": model.audio, "visual": model.visual}, job_id="misuse", attempt=0)
    hook.open()
    with pytest.raises(RuntimeError, match="on_epoch_start"):
        hook.after_forward(scores={"audio": 1.0, "visual": 1.0}, count=2)
    hook.on_epoch_start(0)
    with pytest.raises(RuntimeError, match="without the step's scores"):
        hook.after_backward()
    fused, uni, y = backward(model, 0)
    hook.after_forward(logits=uni, labels=y)
    with pytest.raises(RuntimeError, match="twice"):
        hook.after_forward(logits=uni, labels=y)
    with pytest.raises(RuntimeError, match="already"):
        hook.after_backward(logits=uni, labels=y)
    with pytest.raises(RuntimeError, match="inside a step"):
        hook.on_epoch_end()
    hook.after_backward()
    hook.on_epoch_end()
    hook.close()
