"""The report started by the backward pass (``overlap="backward"``, ``client/report_trigger.py``):
it starts on the report thread while ``backward()`` runs, a step whose hooked tensors get no
gradient still reports (inline), and the training is the inline mode's, bit for bit."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch import nn

from regulator_client import RegulatorClient
from regulator_client.hook import InfoRegHook

from .test_hook import TwoModalNet, batch
from .test_hook_factors import history_bytes, run_hook

WAIT_S = 60.0  # generous: a loaded machine is slow; a report that never starts fails the test instead


class Recording:
    """Wraps the hook's ``Delivery.report`` (the real one runs): which thread sent each Report,
    and whether the backward pass was still running then."""

    def __init__(self, hook: InfoRegHook) -> None:
        self.threads: list[str] = []
        self.during_backward: list[bool] = []
        self.in_backward = False
        self.started = threading.Event()
        real = hook.delivery.report

        def report(req: Any) -> Any:
            self.threads.append(threading.current_thread().name)
            self.during_backward.append(self.in_backward)
            self.started.set()
            return real(req)

        hook.delivery.report = report  # type: ignore[method-assign]


def hooked(job: str, overlap: Any = "backward") -> tuple[InfoRegHook, TwoModalNet, RegulatorClient]:
    torch.manual_seed(1)
    model = TwoModalNet()
    client = RegulatorClient.in_process()
    hook = InfoRegHook(client, {"audio": model.audio, "visual": model.visual}, job_id=job, attempt=0,
                       profile="official", keep_history=True, overlap=overlap)
    return hook, model, client


def test_the_report_starts_on_the_report_thread_while_backward_runs() -> None:
    hook, model, client = hooked("trigger-during")
    rec = Recording(hook)
    first = next(model.audio.parameters())  # an early layer: its gradient comes late in the backward pass

    def hold(grad: torch.Tensor) -> None:
        # the backward pass waits here until the report has started (or gives up): deterministic, no timing
        rec.started.wait(WAIT_S)

    with hook:
        hook.on_epoch_start(0)
        for s in range(3):
            a, v, y = batch(s)
            model.zero_grad()
            fused, uni = model(a, v)
            hook.after_forward(logits=uni, labels=y)
            rec.started.clear()
            handle = first.register_hook(hold)
            rec.in_backward = True
            nn.functional.cross_entropy(fused, y).backward()
            rec.in_backward = False
            handle.remove()
            result = hook.after_backward()
            assert not result.fallback
        hook.on_epoch_end()
    assert rec.during_backward == [True, True, True]
    assert all(name.startswith("inforeg-report") for name in rec.threads)
    assert hook._exchange._trigger.fired == 3
    assert not hook._exchange._trigger._handles  # removed once the step was taken


def test_a_step_whose_encoders_get_no_gradient_reports_inline() -> None:
    hook, model, client = hooked("trigger-no-grad")
    rec = Recording(hook)
    with hook:
        hook.on_epoch_start(0)
        for s in range(2):
            a, v, y = batch(s)
            model.zero_grad()
            feats = torch.cat([model.audio(a).detach(), model.visual(v).detach()], 1)  # encoders out of the graph
            fused, uni = model(a, v)
            hook.after_forward(logits=uni, labels=y)
            nn.functional.cross_entropy(model.head(feats), y).backward()
            hook.after_backward()
        a, v, y = batch(2)  # and a step with no backward pass at all
        fused, uni = model(a, v)
        hook.after_forward(logits=uni, labels=y)
        hook.after_backward()
        hook.on_epoch_end()
        steps = client.get_session("trigger-no-grad", include_steps=True).steps
    assert rec.threads == [threading.current_thread().name] * 3  # inline, on the training thread
    assert rec.during_backward == [False] * 3
    assert hook._exchange._trigger.fired == 0
    assert [s.step for s in steps] == [0, 1, 2]


@pytest.mark.parametrize("profile", ["official", "ogm-ge"])
def test_the_backward_trigger_trains_bit_for_bit_as_inline(profile: str) -> None:
    options: dict[str, Any] = {"profile": profile}
    if profile == "ogm-ge":
        options["scale_params"] = "all"
    triggered, c1, m1 = run_hook(True, range(10), overlap="backward", **options)
    inline, c2, m2 = run_hook(True, range(10), overlap=False, **options)
    forward, c3, m3 = run_hook(True, range(10), overlap=True, **options)
    assert triggered._exchange._trigger.fired == 10
    rows = lambda h: [(r.proximal, r.grad_scale, r.noise_scale, r.fisher) for r in h.history]  # noqa: E731
    assert rows(triggered) == rows(inline) == rows(forward)
    assert history_bytes(c1, "split") == history_bytes(c2, "split") == history_bytes(c3, "split")
    for other in (m2, m3):
        assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), other.state_dict().values()))


def test_overlap_is_checked() -> None:
    model = TwoModalNet()
    with pytest.raises(ValueError, match="overlap must be one of"):
        InfoRegHook(RegulatorClient.in_process(), {"audio": model.audio, "visual": model.visual}, job_id="x",
                    attempt=0, overlap="forward-ish")
