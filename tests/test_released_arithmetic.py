"""The official profile's `released` arithmetic (docs/profiles.md, "Arithmetic: exact and
released"), checked against the formulas as the docs state them, evaluated here independently
step by step with numpy float32: the coefficient, the score sums, the two-rounding proximal
application with its zero-coefficient term, replay in both modes through a real embedded
server, a real training run, and the Fisher-trace argument."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from regulator_cli.main import main as cli_main
from regulator_client import RegulatorClient
from regulator_client.hook import InfoRegHook
from regulator_client.stats import EncoderProbe, score_sums
from regulator_service.policy import BUILTIN_PROFILES, ProfileError
from regulator_service.policy.base import Policy, Window
from regulator_service.policy.official import exact_coefficient, released_coefficient

from .conftest import data_file, read_jsonl
from .test_hook import TwoModalNet, batch

F32 = np.float32
U = 2.0**-24  # float32 unit roundoff


def hand_coefficient(gain: float, lead: float, other: float) -> np.float32:
    """docs: gap = s_lead - s_other in float32; t = tanh(gap) rounded to float32; e = exp(t)
    rounded to float32; beta = float32(gain) * e in float32."""
    gap = F32(lead) - F32(other)
    t = F32(math.tanh(float(gap)))
    e = F32(math.exp(float(t)))
    return F32(gain) * e


def bits(x: float) -> str:
    return F32(x).view(np.uint32).item().to_bytes(4, "big").hex()


def official(arithmetic: str) -> Policy:
    return BUILTIN_PROFILES.get("official").resolve({"arithmetic": arithmetic}, ("a", "v")).policy(("a", "v"))


OPEN = (Window(True, 1.0), Window(True, 1.0))


# -- the coefficient ----------------------------------------------------------------------------


def test_a_step_where_float32_and_float64_round_to_different_coefficients() -> None:
    lead, other = 7.884971618652344, 7.174369812011719  # two float32 batch score sums
    want = hand_coefficient(0.95, lead, other)
    assert bits(want) == "3fe00850"  # 1.7502536773681640625
    released = official("released").proximal(OPEN, 64, (lead, other))
    exact = official("exact").proximal(OPEN, 64, (lead, other))
    assert bits(released[0]) == "3fe00850" and float(want) == released[0] and released[1] == 0.0
    assert exact[0] == 0.95 * math.exp(math.tanh(lead - other))  # float64, as the equations state
    assert bits(exact[0]) == "3fe00851"  # rounded to float32 it is one ulp above the released value


def test_the_other_modality_uses_its_gain_in_float32() -> None:
    ref, other = 6.36505126953125, 6.3948187828063965  # the shipped trace's first step
    got = official("released").proximal(OPEN, 64, (ref, other))
    assert got[0] == 0.0 and got[1] == float(hand_coefficient(0.1, other, ref))
    assert got[1] != official("exact").proximal(OPEN, 64, (ref, other))[1]


def test_released_compares_the_float32_sums() -> None:
    """Sums that differ in float64 but round to the same float32 are a tie: nobody is slowed."""
    s = float(F32(5.5))
    above = s + 2.0**-30  # rounds back to s in float32
    assert float(F32(above)) == s
    assert official("released").proximal(OPEN, 8, (above, s)) == (0.0, 0.0)
    assert official("exact").proximal(OPEN, 8, (above, s))[0] > 0.0


def test_random_float32_sums_match_the_hand_formula_bit_for_bit() -> None:
    rng = random.Random(3)
    differ = 0
    for _ in range(2000):
        lead, other = sorted((float(F32(rng.uniform(0, 64))) for _ in range(2)), reverse=True)
        gain = rng.choice([0.95, 0.1, 0.3, 2.0])
        got = released_coefficient(gain, lead, other)
        assert got == float(hand_coefficient(gain, lead, other))
        differ += got != float(F32(exact_coefficient(gain, lead, other)))
    assert differ > 0  # float32 and float64 disagree on some of them


def test_a_bad_arithmetic_is_refused_with_its_name() -> None:
    with pytest.raises(ProfileError, match=r"official.arithmetic must be one of \['exact', 'released'\], got 'float32'"):
        BUILTIN_PROFILES.get("official").resolve({"arithmetic": "float32"}, ("a", "v"))
    assert BUILTIN_PROFILES.get("official").resolve({}, ("a", "v")).params.arithmetic == "exact"


# -- the client: score sums and the proximal application -----------------------------------------


def test_released_score_sums_add_one_sample_after_the_other_in_float32() -> None:
    g = torch.Generator().manual_seed(4)
    logits = [torch.randn(64, 6, generator=g) * 3 for _ in range(2)]
    labels = torch.randint(0, 6, (64,), generator=g)
    got = score_sums(logits, labels, released=True)
    exact = score_sums(logits, labels)
    for m, lg in enumerate(logits):
        p = torch.softmax(lg, dim=1).gather(1, labels.reshape(-1, 1)).squeeze(1).numpy()
        total = F32(0.0)
        for x in p:  # left to right, every addition rounded to float32
            total = F32(total + x)
        assert got[m].item() == float(total)
    assert not torch.equal(got, exact)  # these batches' float32 sums are not their float64 sums


def _probe_with_grads(seed: int) -> tuple[EncoderProbe, TwoModalNet]:
    torch.manual_seed(seed)
    model = TwoModalNet()
    probe = EncoderProbe({"audio": model.audio, "visual": model.visual}, arithmetic="released")
    probe.snapshot()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # the weights moved since the epoch's start
    a, v, y = batch(seed)
    fused, _ = model(a, v)
    nn.functional.cross_entropy(fused, y).backward()
    return probe, model


def test_the_proximal_term_is_rounded_twice_bit_for_bit() -> None:
    beta = float(hand_coefficient(0.95, 7.884971618652344, 7.174369812011719))
    probe, _ = _probe_with_grads(7)
    before = [p.grad.clone() for p in probe.params]
    probe.apply([beta, 0.0])
    n_differ = 0
    for i, p in enumerate(probe.params):
        g, w, w0 = before[i].numpy(), p.detach().numpy(), probe.anchors[i].numpy()
        a = F32(beta) if probe.owner[i] == 0 else F32(0.0)
        want = g + a * (w - w0)  # numpy float32: w - w0, times a, plus g, each rounded
        assert np.array_equal(p.grad.numpy().view(np.uint32), want.view(np.uint32)), i
        if probe.owner[i] == 0:  # one rounding of grad + a * delta (float64 holds a * delta exactly)
            fused = (g.astype(np.float64) + np.float64(a) * (w - w0).astype(np.float64)).astype(F32)
            n_differ += int((want != fused).sum())
    assert n_differ > 0  # rounding the product on its own gives other bits on some elements


def test_a_zero_coefficient_turns_minus_zero_into_plus_zero_where_the_weight_did_not_move_down() -> None:
    lin = nn.Linear(3, 1, bias=False)
    other = nn.Linear(2, 1, bias=False)
    for arithmetic, want in (("released", [0.0, -0.0, 0.0]), ("exact", [-0.0, -0.0, -0.0])):
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[1.0, 1.0, 1.0]]))
        probe = EncoderProbe({"a": lin, "b": other}, arithmetic=arithmetic)
        probe.snapshot()
        with torch.no_grad():
            lin.weight.add_(torch.tensor([[0.5, -0.5, 0.0]]))  # up, down, unmoved
        lin.weight.grad = torch.tensor([[-0.0, -0.0, -0.0]])
        other.weight.grad = torch.tensor([[1.0, 2.0]])
        probe.apply([0.0, 0.0])
        got = lin.weight.grad[0].tolist()
        assert [math.copysign(1.0, x) for x in got] == [math.copysign(1.0, x) for x in want], arithmetic
        assert other.weight.grad.tolist() == [[1.0, 2.0]]


# -- replay in both modes (a real embedded gRPC server) ------------------------------------------


def test_replay_in_both_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = data_file("trace_pix+mor_seed0.jsonl")
    out = {m: tmp_path / f"{m}.jsonl" for m in ("exact", "released")}
    assert cli_main(["replay", str(trace), "--profile", "official", "-o", str(out["exact"])]) == 0
    assert cli_main(["replay", str(trace), "--profile", "official", "--profile-param", "arithmetic=released",
                     "-o", str(out["released"])]) == 0
    exact, released = read_jsonl(out["exact"]), read_jsonl(out["released"])
    assert exact == read_jsonl(data_file("trace_pix+mor_seed0_expected_official.jsonl"))  # the default is exact
    steps = [r for r in read_jsonl(trace) if r["type"] == "step"]
    gains = {"pix": 0.95, "mor": 0.1}  # pix is the trace's reference modality
    regulated = differ = 0
    for s, e, r in zip(steps, exact, released):
        assert (r["epoch"], r["step"]) == (s["epoch"], s["step"])
        for m, o in (("pix", "mor"), ("mor", "pix")):
            assert (r["factors"][m] != 0.0) == (e["factors"][m] != 0.0)  # the same decisions
            if r["factors"][m] != 0.0:
                regulated += 1
                lead, other = s["score_sum"][m], s["score_sum"][o]
                assert r["factors"][m] == float(hand_coefficient(gains[m], lead, other))
                differ += r["factors"][m] != e["factors"][m]
    assert regulated == 200 and differ == regulated
    capsys.readouterr()
    assert cli_main(["replay", str(trace), "--profile", "official", "--param", "arithmetic=float32",
                     "-o", str(tmp_path / "bad.jsonl")]) == 1
    assert "INVALID_ARGUMENT: official.arithmetic must be one of ['exact', 'released'], got 'float32'" in capsys.readouterr().err


# -- a real training run ----------------------------------------------------------------------


def train(arithmetic: str, tmp_path: Path, epochs: int = 2, steps: int = 4) -> dict:
    torch.manual_seed(5)
    model = TwoModalNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    client = RegulatorClient.in_process()
    hook = InfoRegHook(client, {"audio": model.audio, "visual": model.visual},
                       job_id=f"arith-{arithmetic}", attempt=0, profile="official",
                       profile_params={"arithmetic": arithmetic}, record=tmp_path / f"{arithmetic}.jsonl")
    probe = hook.probe
    log: dict = {"steps": [], "fisher": []}
    hook.open()
    for epoch in range(epochs):
        hook.on_epoch_start(epoch)
        acc = [torch.zeros_like(probe.params[i]) for i in probe.fisher_idx]  # the released form
        hook_fisher = [0.0, 0.0]
        for s in range(steps):
            a, v, y = batch(100 * epoch + s)
            opt.zero_grad()
            fused, uni = model(a, v)
            nn.functional.cross_entropy(fused, y).backward()
            before = [p.grad.clone() for p in probe.params]
            weights = [p.detach().clone() for p in probe.params]
            result = hook.after_backward(logits=uni, labels=y)
            log["steps"].append((before, weights, [w.clone() for w in probe.anchors], result,
                                 [p.grad.clone() for p in probe.params]))
            for j, i in enumerate(probe.fisher_idx):
                g = probe.params[i].grad
                acc[j] += g * g
            hook_fisher = [f + result.fisher[m] for f, m in zip(hook_fisher, ("audio", "visual"))]
            opt.step()
        hook.on_epoch_end()
        released_form = [0.0, 0.0]
        for j, i in enumerate(probe.fisher_idx):
            released_form[probe.owner[i]] += acc[j].mean().item()
        log["fisher"].append((hook_fisher, released_form))
    hook.close()
    log["weights"] = [p.detach().clone() for p in model.parameters()]
    log["trace"] = read_jsonl(tmp_path / f"{arithmetic}.jsonl")
    log["n_max"] = max(probe.params[i].numel() for i in probe.fisher_idx)
    log["owner"] = list(probe.owner)
    log["recorded"] = [
        {ms.modality: ms.factors.proximal for ms in st.modalities}
        for st in client.get_session(f"arith-{arithmetic}", include_steps=True).steps
    ]
    return log


@pytest.mark.e2e
def test_training_runs_differ_where_the_arithmetic_says(tmp_path: Path) -> None:
    exact, released = train("exact", tmp_path), train("released", tmp_path)
    for k, (before, weights, anchors, result, after) in enumerate(released["steps"]):
        coef = [result.proximal["audio"], result.proximal["visual"]]
        assert any(c != 0.0 for c in coef) or k >= 4  # epoch 0's window is open by construction
        for i, (g, w, w0, got) in enumerate(zip(before, weights, anchors, after)):
            m = released["owner"][i]  # zero coefficients included: grad + 0 * (w - w0)
            want = g.numpy() + F32(coef[m]) * (w.numpy() - w0.numpy())  # two roundings, numpy float32
            assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32)), (k, i)
    # the step statistics: float32 sums in released mode, and the coefficients from them: the
    # regulator's record by the docs' formula, the applied one with torch's tanh and exp
    steps = [r for r in released["trace"] if r["type"] == "step"]
    assert len(steps) == len(released["recorded"]) == len(released["steps"])
    device_differs = 0
    for r, recorded, (_, _, _, result, _) in zip(steps, released["recorded"], released["steps"]):
        for m, o, gain in (("audio", "visual", 0.95), ("visual", "audio", 0.1)):
            assert float(F32(r["score_sum"][m])) == r["score_sum"][m]
            assert (recorded[m] != 0.0) == (result.proximal[m] != 0.0)
            if recorded[m] != 0.0:
                lead, other = r["score_sum"][m], r["score_sum"][o]
                assert recorded[m] == float(hand_coefficient(gain, lead, other))
                gap = torch.tensor(lead, dtype=torch.float32) - torch.tensor(other, dtype=torch.float32)
                on_device = torch.tensor(gain, dtype=torch.float32) * torch.exp(torch.tanh(gap))
                assert result.proximal[m] == on_device.item()
                device_differs += result.proximal[m] != recorded[m]
    print(f"steps where torch's tanh/exp round otherwise than float64 rounded to float32: {device_differs}")
    # step 0: same weights and gradients in both runs, different coefficients, and so on
    e0, r0 = exact["steps"][0][3], released["steps"][0][3]
    assert all(torch.equal(a, b) for a, b in zip(exact["steps"][0][0], released["steps"][0][0]))
    assert e0.proximal != r0.proximal
    assert not all(torch.equal(a, b) for a, b in zip(exact["weights"], released["weights"]))
    # the Fisher argument: on the same gradients the released form is within its error bound
    for hook_fisher, released_form in released["fisher"]:
        bound = (4 + 2 * released["n_max"]) * U * 1.01
        for h, r in zip(hook_fisher, released_form):
            assert abs(h - r) <= bound * r


# -- the Fisher-trace argument --------------------------------------------------------------


def window_statistic(traces: list[float], epoch: int, n: int = 10) -> float:
    hist = [0.0] * n + traces[:epoch]
    tr1, tr2 = sum(hist[-n:]) / n, sum(hist[-n - 1 : -1]) / n
    return (tr1 - tr2) / tr1


def flip_bound(k: float, rho: float) -> float:
    """docs: traces off by at most rho relative move k by at most 2 rho (1 - k) / (1 - rho)."""
    return 2.0 * rho * (1.0 - k) / (1.0 - rho)


def test_relative_trace_errors_move_the_window_statistic_within_the_bound() -> None:
    rng = random.Random(11)
    for _ in range(300):
        traces = [rng.uniform(0.0, 5.0) * rng.choice([1e-4, 1.0, 1e3]) for _ in range(rng.randint(1, 25))]
        rho = rng.choice([1e-6, 1e-4, 1e-2])
        for epoch in range(1, len(traces) + 1):
            k = window_statistic(traces, epoch)
            # the worst case: the newer average up, the older down (and the reverse), and random
            for sign in (1, -1, 0):
                bent = [t * (1 + (sign * rho * (1 if j == epoch - 1 else -1) if sign else rng.uniform(-rho, rho)))
                        for j, t in enumerate(traces)]
                moved = abs(window_statistic(bent, epoch) - k)
                assert moved <= flip_bound(k, rho) * (1 + 1e-9) + 1e-12


def test_no_window_of_the_shipped_run_is_within_reach_of_the_fisher_difference() -> None:
    rows = [json.loads(line) for line in data_file("trace_pix+mor_seed0.jsonl").read_text().splitlines()]
    traces, current = [], 0.0
    for r in rows:
        if r["type"] == "step":
            current += r["fisher"]["pix"]
        elif r["type"] == "epoch_end":
            traces.append(current)
            current = 0.0
    rho = 1e-4  # 70 times the largest difference measured between the two forms on a real run
    for epoch in range(1, len(traces) + 1):
        k = window_statistic(traces, epoch)
        assert abs(k - 0.05) > flip_bound(k, rho), epoch


def test_the_hook_re_evaluates_only_the_released_official_coefficient(caplog: pytest.LogCaptureFixture) -> None:
    from regulator_client.profiles import make_profile
    from regulator_client.released import device_proximal, released_gains

    mods = ("v", "a")
    assert released_gains(make_profile("official", arithmetic="released", reference_modality="a",
                                       reference_gain=0.5, other_gain=0.25), mods) == (0.25, 0.5)
    assert released_gains(make_profile("official", reference_modality="a"), mods) is None
    assert released_gains(make_profile("paper"), mods) is None
    lead, other = 7.884971618652344, 7.174369812011719
    srv = float(hand_coefficient(0.95, lead, other))
    got = device_proximal((srv, 0.0), (lead, other), (0.95, 0.1), torch.device("cpu"))
    gap = torch.tensor(lead, dtype=torch.float32) - torch.tensor(other, dtype=torch.float32)
    assert got == ((0.95 * torch.exp(torch.tanh(gap))).item(), 0.0)
    # a regulator that computes something else: its value is applied, with a warning
    assert device_proximal((srv * 1.001, 0.0), (lead, other), (0.95, 0.1), torch.device("cpu")) == (srv * 1.001, 0.0)
    assert "differ by more than 4 float32 ulps" in caplog.text
