"""The client at first contact (issue 17.4): a target that does not answer is named while the job
waits; a job that names no profile gets ``official`` for two modalities (``paper`` otherwise)
and one line says what is in force; any fusion whose per-modality logits exist, and ready
``scores=``/``count=`` for other heads, train through a real regulator."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from inforeg.regulator.v1 import regulator_pb2 as pb
from torch import nn

from regulator_client import RegulatorClient
from regulator_client.delivery import Delivery, RegulatorUnreachable
from regulator_client.hook import InfoRegHook
from regulator_client.profiles import profile_name, profile_params

from .conftest import ROOT
from .test_client_env import dead_port

WAITED = re.compile(r"has waited ([0-9.]+)s")


def linear_pair(n: int = 2) -> dict[str, nn.Module]:
    return {name: nn.Linear(4, 3) for name in "abc"[:n]}


# -- a target that does not answer ------------------------------------------------------------------


def test_a_dead_target_is_named_while_the_session_waits(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="regulator_client")
    with dead_port() as (_, dead):
        hook = InfoRegHook(RegulatorClient.connect(dead, timeout=0.3), linear_pair(), job_id="dead", wait_timeout=1.5, warn_every_s=0.2)
        with pytest.raises(RegulatorUnreachable, match=rf"the regulator at {dead} did not answer OpenSession for"):
            hook.open()
    waits = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(waits) >= 2  # named, and named again while it waits
    for w in waits:
        assert w.startswith(f"regulator at {dead} does not answer: OpenSession has waited "), w
        assert w.endswith("then failing the job (on_unavailable='wait', wait_timeout=1.5s)"), w
        assert "retrying for up to" in w
    waited = [float(WAITED.search(w).group(1)) for w in waits]  # type: ignore[union-attr]
    assert waited == sorted(waited)


def test_a_step_waiting_for_its_answer_is_named_too(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="regulator_client")
    with dead_port() as (_, dead):
        delivery = Delivery(RegulatorClient.connect(dead, timeout=0.3), "wait", call_timeout=0.3, wait_timeout=1.0, warn_every_s=0.2)
        with pytest.raises(RegulatorUnreachable, match=rf"at {dead} did not answer Report of step 7"):
            delivery.report(pb.ReportRequest(job_id="j", step=7, count=1))
    waits = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
    assert waits and all(w.startswith(f"regulator at {dead} does not answer: Report of step 7 has waited") for w in waits)
    with pytest.raises(ValueError, match="warn_every_s"):
        Delivery(RegulatorClient.in_process(), warn_every_s=0)


# -- the default profile --------------------------------------------------------------------------


def test_no_profile_named_is_official_for_two_modalities_and_paper_otherwise(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="regulator_client")
    client = RegulatorClient.in_process()
    two = InfoRegHook(client, linear_pair(2), job_id="two", attempt=0)
    three = InfoRegHook(client, linear_pair(3), job_id="three", attempt=0)
    pinned = InfoRegHook(client, linear_pair(2), job_id="pinned", attempt=0, profile="paper")
    assert [profile_name(h.profile) for h in (two, three, pinned)] == ["official", "paper", "paper"]
    sessions = [h.open() for h in (two, three, pinned)]
    assert [profile_name(s.profile) for s in sessions if s is not None] == ["official", "paper", "paper"]
    assert profile_name(client.open_session("raw", ["x", "y"]).session.profile) == "official"  # the same rule
    assert profile_name(client.open_session("raw3", ["x", "y", "z"]).session.profile) == "paper"
    lines = [r.getMessage() for r in caplog.records if r.name == "regulator_client.hook" and r.levelno == logging.INFO]
    assert len(lines) == 3
    for line, job, session, mods in zip(lines, ("two", "three", "pinned"), sessions, ("a, b", "a, b, c", "a, b")):
        assert session is not None
        params = ", ".join(f"{k}={v!r}" for k, v in profile_params(session.profile).items())
        assert line == (f"InfoReg session of job {job} (attempt 0, regulator in-process): profile "
                        f"{profile_name(session.profile)} ({params}), modalities {mods}, on_unavailable=wait")
    assert "profile official (reference_modality='a', threshold=" in lines[0]


@pytest.mark.e2e
def test_the_profile_line_shows_without_any_logging_setup() -> None:
    """A script that configures no logging still sees which profile is in force, and the warning
    that names a silent target; a script that does configure it (here: warnings only) is obeyed."""
    script = textwrap.dedent("""
        import logging, socket, sys
        from torch import nn
        from regulator_client import RegulatorClient
        from regulator_client.hook import InfoRegHook
        enc = {"audio": nn.Linear(4, 3), "visual": nn.Linear(4, 3)}
        InfoRegHook(RegulatorClient.in_process(), enc, job_id="bare", attempt=0).open()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = RegulatorClient.connect(f"127.0.0.1:{s.getsockname()[1]}", timeout=0.3)
            try:
                InfoRegHook(dead, enc, job_id="silent", wait_timeout=0.8, warn_every_s=0.2).open()
            except Exception as exc:
                print("failed:", type(exc).__name__, file=sys.stderr)
        print("--- configured", file=sys.stderr, flush=True)
        logging.basicConfig(level=logging.WARNING)
        InfoRegHook(RegulatorClient.in_process(), enc, job_id="quiet", attempt=0).open()
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    bare, configured = done.stderr.split("--- configured\n")
    assert "InfoReg session of job bare (attempt 0, regulator in-process): profile official (reference_modality='audio'" in bare
    assert re.search(r"^regulator at 127\.0\.0\.1:\d+ does not answer: OpenSession has waited", bare, re.M), bare
    assert "failed: RegulatorUnreachable" in bare
    assert "quiet" not in configured


# -- any fusion, any head -------------------------------------------------------------------------


def two_views(step: int, n: int = 16, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """View a carries the label, view b barely."""
    g = torch.Generator().manual_seed(100 + step)
    y = torch.randint(0, classes, (n,), generator=g)
    onehot = F.one_hot(y, 6).float()  # classes <= 6
    return 2.0 * onehot + 0.3 * torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g) + 0.2 * onehot, y


class LateFusion(nn.Module):
    """One head per modality, fused by summing their logits: no concat head to split."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({"a": nn.Sequential(nn.Linear(6, 12), nn.ReLU()), "b": nn.Sequential(nn.Linear(6, 12), nn.ReLU())})
        self.heads = nn.ModuleDict({"a": nn.Linear(12, classes), "b": nn.Linear(12, classes)})

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        uni = {m: self.heads[m](self.enc[m](x)) for m, x in (("a", xa), ("b", xb))}
        return uni["a"] + uni["b"], uni


def true_class_sum(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.softmax(logits.detach().double(), 1).gather(1, y[:, None]).sum())


@pytest.mark.e2e
def test_late_fusion_trains_through_a_real_regulator(client: RegulatorClient) -> None:
    torch.manual_seed(0)
    model = LateFusion()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    hook = InfoRegHook(client, dict(model.enc), job_id="late-fusion", keep_history=True)  # no profile: official
    sent: list[dict[str, float]] = []
    with hook:
        for epoch in range(2):
            hook.on_epoch_start(epoch)
            for i in range(6):
                xa, xb, y = two_views(epoch * 6 + i)
                opt.zero_grad()
                fused, uni = model(xa, xb)
                hook.after_forward(logits=uni, labels=y)  # {modality: [B, C]}, whatever the fusion
                F.cross_entropy(fused, y).backward()
                hook.after_backward()
                opt.step()
                sent.append({m: true_class_sum(lg, y) for m, lg in uni.items()})
            hook.on_epoch_end()
    steps = list(client.steps("late-fusion"))
    assert [s.step for s in steps] == list(range(12)) and not any(s.fallback for s in steps)
    for s, expected in zip(steps, sent):  # the score is the true-class softmax probability, summed
        assert s.count == 16
        assert {m.modality: m.score_sum for m in s.modalities} == pytest.approx(expected, rel=1e-6)
    assert all(r.proximal["a"] > 0 for r in hook.history)  # official slows the view that leads: a
    assert all(r.proximal["b"] == 0 for r in hook.history)


@pytest.mark.e2e
def test_scores_and_count_for_a_head_without_class_logits(client: RegulatorClient) -> None:
    """A binary head with one logit per modality (sigmoid): the caller passes the true-class
    probability sums itself. They are what the logits path would compute for ``[0, z]``."""
    torch.manual_seed(0)
    model = LateFusion(classes=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    hook = InfoRegHook(client, dict(model.enc), job_id="binary", profile="official", keep_history=True)
    sent: list[dict[str, float]] = []
    with hook:
        for epoch in range(2):
            hook.on_epoch_start(epoch)
            for i in range(6):
                xa, xb, y = two_views(epoch * 6 + i, classes=2)
                opt.zero_grad()
                fused, uni = model(xa, xb)
                p_true = {m: torch.where(y == 1, torch.sigmoid(z[:, 0]), 1 - torch.sigmoid(z[:, 0])).detach().double().sum()
                          for m, z in uni.items()}
                as_logits = {m: torch.cat([torch.zeros_like(z), z], 1) for m, z in uni.items()}
                assert hook.local_scores(as_logits, y)[:2].tolist() == pytest.approx([float(p_true["a"]), float(p_true["b"])], rel=1e-6)
                hook.after_forward(scores=p_true, count=len(y))  # device tensors or floats
                F.binary_cross_entropy_with_logits(fused[:, 0], y.float()).backward()
                hook.after_backward()
                opt.step()
                sent.append({m: float(v) for m, v in p_true.items()})
            hook.on_epoch_end()
    steps = list(client.steps("binary"))
    assert [s.count for s in steps] == [16] * 12
    assert [{m.modality: m.score_sum for m in s.modalities} for s in steps] == sent  # exactly what was passed
    assert any(r.proximal["a"] > 0 for r in hook.history)
