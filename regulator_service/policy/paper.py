"""Profile ``paper``: the equations of arXiv 2503.18595 as docs/profiles.md states them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .base import CLOSED, ProximalPolicy, Window
from .spec import MAX_EPOCH, MAX_STRENGTH, ProfileSpec, param

GROWTH_WHY = "a relative growth of the Fisher trace: below 0 the window would open while the trace shrinks, at 1 or above it never opens"


@dataclass(frozen=True)
class PaperParams:
    beta: float = param(0.9, "Eq. 16 strength: alpha = exp(beta * tanh(gap))", low=0.0, high=MAX_STRENGTH)
    threshold: float = param(0.04, "Eq. 11 K: the window opens iff the trace grew by more than K", low=0.0, high=1.0, high_open=True, why=GROWTH_WHY)
    warmup_epochs: int = param(2, "epochs 0..warmup-1 are never regulated", low=2, high=MAX_EPOCH, why="Eq. 11 needs two closed epochs")


def gaps(scores: Sequence[float]) -> tuple[float, ...]:
    """Eq. 9-10: each modality's mean lead over the modalities that score strictly lower."""
    out = []
    for s in scores:
        lower = [s - other for other in scores if other < s]
        out.append(sum(lower) / len(lower) if lower else 0.0)
    return tuple(out)


def growth_window(trace_prev: float, trace_prev2: float, threshold: float) -> Window:
    """Eq. 11 for one modality: open iff (Tr[t-1] - Tr[t-2]) / Tr[t-1] > K."""
    if not (math.isfinite(trace_prev) and math.isfinite(trace_prev2)) or trace_prev <= 0.0:
        return CLOSED
    growth = (trace_prev - trace_prev2) / trace_prev
    return Window(open=growth > threshold, growth=growth)


@dataclass(frozen=True)
class PaperPolicy(ProximalPolicy):
    params: PaperParams
    modalities: tuple[str, ...]
    name: str = "paper"

    def window(self, traces: Sequence[Sequence[float]], epoch: int) -> tuple[Window, ...]:
        if epoch < max(2, self.params.warmup_epochs):
            return tuple(CLOSED for _ in self.modalities)
        return tuple(
            growth_window(tr[epoch - 1], tr[epoch - 2], self.params.threshold) for tr in traces
        )

    def proximal(
        self, window: Sequence[Window], count: int, score_sums: Sequence[float]
    ) -> tuple[float, ...]:
        deltas = gaps([s / count for s in score_sums])
        beta = self.params.beta
        return tuple(
            math.exp(beta * math.tanh(d)) if w.open and d > 0.0 else 0.0
            for w, d in zip(window, deltas)
        )


SPEC = ProfileSpec(
    name="paper",
    params=PaperParams,
    policy=PaperPolicy,
    summary="the paper's Eq. 9-16: per-modality windows from each trace's growth, gap over the weaker modalities",
    min_modalities=2,
    oneof="paper",
)
