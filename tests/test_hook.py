"""The training-side hook: Fisher statistics, proximal update, scores, trace recording."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from regulator_client import RegulatorClient
from regulator_client.heads import concat_unimodal_logits
from regulator_client.hook import InfoRegHook
from regulator_client.stats import score_sums
from regulator_cli.main import main as cli_main

from .conftest import read_jsonl


class ConvEncoder(nn.Module):
    """Conv + norm + linear: weights count towards Fisher, biases and norm layers do not."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv1d(4, 4, 3)
        self.ln = nn.LayerNorm(24)
        self.fc = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x)))  # [B, 4, 8, 8]
        h = self.conv2(h.mean(dim=2))  # [B, 4, 6]
        return torch.relu(self.fc(self.ln(h.flatten(1))))


class TwoModalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = ConvEncoder(1)
        self.visual = ConvEncoder(3)
        self.head = nn.Linear(16, 5)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = {"audio": self.audio(a), "visual": self.visual(v)}
        fused = self.head(torch.cat(list(feats.values()), 1))
        return fused, concat_unimodal_logits(self.head, feats)  # type: ignore[return-value]


def batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def brute_fisher(encoder: nn.Module, include_all: bool = False) -> float:
    total = 0.0
    for module in encoder.modules():
        params = [module.weight] if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) else []
        if include_all:
            params = list(module.parameters(recurse=False))
        for p in params:
            g = p.grad.double()
            total += float((g * g).sum()) / p.numel()
    return total


def float32_bound(model: nn.Module) -> float:
    """Relative error bound of the hook's default Fisher value against exact arithmetic: each
    weight tensor's sum of n squares is accumulated in float32, and a float32 sum of n
    non-negative terms, in any order, is within (n+1)u of the exact sum (u = 2^-24; n-1 additions
    plus the rounding of each square, Higham, Accuracy and Stability, ch. 4), plus two roundings
    for a norm that is squared. The per-tensor results are summed in float64 (negligible). The
    bound holds on any machine and any summation order: here n <= 192, so about 1.2e-5."""
    n = max(p.numel() for p in model.parameters())
    return (n + 3) * 2.0**-24


@pytest.mark.parametrize("fisher_dtype", [torch.float32, torch.float64])
def test_fisher_matches_brute_force_and_proximal_reaches_every_parameter(fisher_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = TwoModalNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    client = RegulatorClient.in_process()
    hook = InfoRegHook(client, {"audio": model.audio, "visual": model.visual}, job_id="fisher", profile="official",
                       fisher_dtype=fisher_dtype, keep_history=True)
    rel = float32_bound(model) if fisher_dtype == torch.float32 else 1e-12
    hook.open()
    hook.on_epoch_start(0)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    checked_regulated = 0
    for step in range(8):
        a, v, y = batch(step)
        opt.zero_grad()
        fused, uni = model(a, v)
        (nn.functional.cross_entropy(fused, y) + 3 * nn.functional.cross_entropy(uni["audio"], y)).backward()
        before = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        result = hook.after_backward(logits=uni, labels=y)
        for name, enc in (("audio", model.audio), ("visual", model.visual)):
            expected = brute_fisher(enc)  # of the gradient after the proximal term, in float64
            assert result.fisher[name] == pytest.approx(expected, rel=rel)
            # biases and norm layers are excluded, and that makes a difference
            assert brute_fisher(enc, include_all=True) > expected * (1 + 1e-3)
            coef = result.proximal[name]
            for pname, p in model.named_parameters():
                if not pname.startswith(name + "."):
                    continue
                want = before[pname] + coef * (p.detach() - anchors[pname])
                torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-7)
        checked_regulated += sum(c > 0 for c in result.proximal.values())
        # the head is never regulated
        torch.testing.assert_close(model.head.weight.grad, before["head.weight"])
        opt.step()
    assert checked_regulated >= 4  # the official window is open in epoch 0: most steps regulated
    hook.on_epoch_end()  # carries step 7's deferred value
    # the regulator recorded exactly the values the hook measured, and their sum as the trace
    detail = client.get_session("fisher", include_steps=True)
    assert [[m.fisher for m in s.modalities] for s in detail.steps] == [list(r.fisher.values()) for r in hook.history]
    assert [m.fisher_trace for m in detail.epochs[0].modalities] == [
        sum(r.fisher[m] for r in hook.history) for m in ("audio", "visual")]
    assert {"audio.norm.weight", "audio.ln.bias", "audio.conv.bias"} <= {n for n, _ in model.named_parameters()}


def test_score_sums_match_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g) * 5]
    y = torch.randint(0, 4, (10,), generator=g)
    got = score_sums(logits, y).tolist()
    for lg, s in zip(logits, got):
        p = torch.softmax(lg.double(), 1)
        assert s == pytest.approx(sum(float(p[i, y[i]]) for i in range(10)), rel=1e-6)


def test_hook_rejects_misuse() -> None:
    model = TwoModalNet()
    client = RegulatorClient.in_process()
    with pytest.raises(ValueError, match="at least 2"):
        InfoRegHook(client, {"audio": model.audio}, job_id="x")
    with pytest.raises(ValueError, match="share a parameter"):
        InfoRegHook(client, {"audio": model.audio, "again": model.audio}, job_id="x")
    with pytest.raises(ValueError, match="no Linear/Conv weight"):
        InfoRegHook(client, {"audio": model.audio, "n": nn.LayerNorm(3)}, job_id="x")
    with pytest.raises(ValueError, match="no job id"):
        InfoRegHook(client, {"audio": model.audio, "visual": model.visual})
    hook = InfoRegHook(client, {"audio": model.audio, "visual": model.visual}, job_id="x")
    with pytest.raises(RuntimeError, match="on_epoch_start"):
        hook.after_backward(scores={"audio": 1.0, "visual": 1.0}, count=2)
    hook.on_epoch_start(0)
    with pytest.raises(ValueError, match="logits for"):
        hook.after_backward(logits={"audio": torch.zeros(2, 5)}, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="out of order"):
        hook.on_epoch_start(3)


def test_recorded_trace_replays_to_the_live_coefficients(tmp_path: Path) -> None:
    """--record on the training side, `regulator replay` on the trace: the same answers."""
    torch.manual_seed(1)
    model = TwoModalNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trace = tmp_path / "live.jsonl"
    hook = InfoRegHook(
        RegulatorClient.in_process(), {"audio": model.audio, "visual": model.visual},
        job_id="rec", profile="official", profile_params={"reference_modality": "visual"},
        record=trace, keep_history=True,
    )
    with hook:
        for epoch in range(3):
            hook.on_epoch_start(epoch)
            for i in range(4):
                a, v, y = batch(10 * epoch + i)
                opt.zero_grad()
                fused, uni = model(a, v)
                nn.functional.cross_entropy(fused, y).backward()
                hook.after_backward(logits=uni, labels=y)
                opt.step()
            hook.on_epoch_end()
    header = json.loads(trace.read_text().splitlines()[0])
    assert header == {"type": "session", "modalities": ["audio", "visual"], "reference_modality": "visual"}
    out = tmp_path / "replay.jsonl"
    assert cli_main(["replay", str(trace), "--profile", "official", "-o", str(out)]) == 0
    replayed = read_jsonl(out)
    live = [{"epoch": r.epoch, "step": r.step, "factors": r.proximal} for r in hook.history]
    assert replayed == live  # bit for bit: floats survive JSON exactly
    assert any(v > 0 for r in live for v in r["factors"].values())
