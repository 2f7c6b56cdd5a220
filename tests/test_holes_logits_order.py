"""A hook reads its logits mapping by key, not in the mapping's order.

The hook is built audio-first; a training loop that passes ``{"visual": v, "audio": a}`` must get
exactly what the encoder-ordered ``{"audio": a, "visual": v}`` gets: the same scores at the
regulator, the same coefficients, and the leading modality (audio, whose logits know the label)
slowed, not visual. Real tiny model, real backward passes, an in-process regulator."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from regulator_client import InfoRegHook, RegulatorClient

CLASSES, BATCH, STEPS = 4, 8, 3


class TwoHeads(nn.Module):
    """Each modality's encoder gives its own class logits; the fused logits are their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Linear(CLASSES, CLASSES)
        self.visual = nn.Linear(CLASSES, CLASSES)
        with torch.no_grad():  # audio reads the label off its input; visual starts uninformed
            self.audio.weight.copy_(3.0 * torch.eye(CLASSES))
            self.audio.bias.zero_()
            self.visual.weight.mul_(0.01)


def batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
        audio = nn.functional.one_hot(labels, CLASSES).float()
        visual = torch.randn(BATCH, CLASSES, generator=g)
        out.append((audio, visual, labels))
    return out


LogitsOf = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def train(model: TwoHeads, job: str, mapping: LogitsOf) -> tuple[list[dict[str, float]], list[list[float]]]:
    """The hook's coefficients per step, and the score sums the regulator recorded (in the
    session's modality order, audio first)."""
    client = RegulatorClient.in_process()
    hook = InfoRegHook(client, {"audio": model.audio, "visual": model.visual}, job_id=job, attempt=0,
                       profile="official", keep_history=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook.on_epoch_start(0)
    for audio, visual, labels in batches():
        opt.zero_grad()
        la, lv = model.audio(audio), model.visual(visual)
        nn.functional.cross_entropy(la + lv, labels).backward()
        hook.after_backward(mapping(la, lv), labels)
        opt.step()
    hook.on_epoch_end()
    steps = list(client.get_session(job, include_steps=True).steps)
    hook.close()
    assert [[m.modality for m in s.modalities] for s in steps] == [["audio", "visual"]] * STEPS
    return [r.proximal for r in hook.history], [[m.score_sum for m in s.modalities] for s in steps]


def test_logits_in_another_order_than_the_encoders_are_read_by_key() -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    ordered = train(copy.deepcopy(model), "ordered", lambda a, v: {"audio": a, "visual": v})
    swapped = train(copy.deepcopy(model), "swapped", lambda a, v: {"visual": v, "audio": a})
    assert swapped == ordered  # the same scores and coefficients, bit for bit
    proximal, scores = swapped
    assert all(audio > visual for audio, visual in scores)  # audio's scores are audio's
    # the window is open in epoch 0 (official): the leader, audio (the reference), is slowed
    assert all(p["audio"] > 0.0 and p["visual"] == 0.0 for p in proximal)
