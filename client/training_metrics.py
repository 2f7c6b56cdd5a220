"""The regulation as flat scalars for training logs (TensorBoard, W&B, MLflow, ...).

``InfoRegHook.metrics()`` returns them; the Hugging Face, Lightning and Accelerate integrations
log the same keys, so one dashboard reads every job. Nothing here touches the device: the values
are what the hook already holds on the host (the last step's answer, the last ``EndEpoch``
answer, the delivery counters), so calling it every step adds no host sync.

Keys (``<m>`` is a modality name; every value is a float):

=====================================  ===========================================================
``inforeg/epoch``                      the epoch of the latest step (between epochs: the one just
                                       closed)
``inforeg/fallback``                   1 if the latest step ran without the regulator's answer
``inforeg/<m>/proximal``               the proximal coefficient applied at the latest step
``inforeg/<m>/window_open``            1/0: the window the latest step ran with (absent on a
                                       fallback step, where it is unknown)
``inforeg/<m>/grad_scale``,            the gradient scale and noise of the latest step; only for
``inforeg/<m>/noise_scale``            profiles whose policy can scale gradients (e.g. ogm-ge)
``inforeg/closed_epoch``               the last epoch closed by this process; the keys below
                                       describe it
``inforeg/<m>/fisher_trace``           Tr(F) of that epoch (the sum of its steps' Fisher values)
``inforeg/<m>/mean_proximal``,         mean and largest proximal coefficient over its steps
``inforeg/<m>/max_proximal``
``inforeg/<m>/regulated_steps``        its steps that regulated the modality
``inforeg/<m>/mean_score``             its mean true-class probability
``inforeg/<m>/growth``                 the statistic its window was decided from (absent while
                                       undefined, e.g. in warm-up)
``inforeg/<m>/next_window_open``       1/0: the window of the next epoch
``inforeg/fallbacks/epoch_steps``      its steps that ran without an answer (regulator's count)
``inforeg/fallbacks/steps``            steps of this process applied without an answer, so far
``inforeg/fallbacks/deferred_epoch_ends``  epoch ends delivered late, so far
``inforeg/fallbacks/waits``            calls that had to wait for the regulator, so far
=====================================  ===========================================================

Step keys appear after the first step, epoch keys after the first epoch end, of this process.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence

from inforeg.regulator.v1 import regulator_pb2 as pb

from .delivery import DeliveryStats

PREFIX = "inforeg"


class StepAnswer(Protocol):
    """What a step applied (the hook's last answer)."""

    proximal: Sequence[float]
    grad_scale: Sequence[float]
    noise_scale: Sequence[float]
    window: Sequence[Optional[bool]]
    answered: bool


def step_metrics(modalities: Sequence[str], answer: StepAnswer, scaled: bool) -> dict[str, float]:
    """The latest step's factors, per modality."""
    out: dict[str, float] = {f"{PREFIX}/fallback": 0.0 if answer.answered else 1.0}
    windows = list(answer.window) if answer.window else [None] * len(modalities)
    for i, m in enumerate(modalities):
        out[f"{PREFIX}/{m}/proximal"] = float(answer.proximal[i])
        if windows[i] is not None:
            out[f"{PREFIX}/{m}/window_open"] = float(bool(windows[i]))
        if scaled:
            out[f"{PREFIX}/{m}/grad_scale"] = float(answer.grad_scale[i])
            out[f"{PREFIX}/{m}/noise_scale"] = float(answer.noise_scale[i])
    return out


def epoch_metrics(end: pb.EndEpochResponse) -> dict[str, float]:
    """The regulator's record of the last closed epoch, per modality, and its next windows."""
    closed = end.closed
    out: dict[str, float] = {
        f"{PREFIX}/closed_epoch": float(closed.epoch),
        f"{PREFIX}/fallbacks/epoch_steps": float(closed.fallback_steps),
    }
    for rec in closed.modalities:
        key = f"{PREFIX}/{rec.modality}"
        out[f"{key}/fisher_trace"] = float(rec.fisher_trace)
        out[f"{key}/mean_proximal"] = float(rec.mean_proximal)
        out[f"{key}/max_proximal"] = float(rec.max_proximal)
        out[f"{key}/regulated_steps"] = float(rec.regulated_steps)
        out[f"{key}/mean_score"] = float(rec.mean_score)
        if rec.HasField("window") and not math.isnan(rec.window.growth):
            out[f"{key}/growth"] = float(rec.window.growth)
    for w in end.next_window:
        out[f"{PREFIX}/{w.modality}/next_window_open"] = float(w.open)
    return out


def delivery_metrics(stats: DeliveryStats) -> dict[str, float]:
    """The client's fallback counters since the hook was built."""
    return {
        f"{PREFIX}/fallbacks/steps": float(stats.fallback_steps),
        f"{PREFIX}/fallbacks/deferred_epoch_ends": float(stats.deferred_epoch_ends),
        f"{PREFIX}/fallbacks/waits": float(stats.waits),
    }


def flat_metrics(
    modalities: Sequence[str],
    *,
    epoch: Optional[int],
    last_step: Optional[StepAnswer],
    last_epoch_end: Optional[pb.EndEpochResponse],
    delivery: DeliveryStats,
    scaled: bool,
) -> dict[str, float]:
    """All of the above in one flat dict (see the module docstring for the keys)."""
    out: dict[str, float] = {}
    if epoch is not None and epoch >= 0:
        out[f"{PREFIX}/epoch"] = float(epoch)
    if last_step is not None:
        out.update(step_metrics(modalities, last_step, scaled))
    if last_epoch_end is not None:
        out.update(epoch_metrics(last_epoch_end))
    out.update(delivery_metrics(delivery))
    return out
