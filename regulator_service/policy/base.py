"""What every regulation policy is: two pure functions over a session's history.

A policy object is built once per session from its (immutable) parameters and modality order and
holds no mutable state, so ``window`` and ``proximal`` are pure functions of their arguments:
the server, the in-process transport and ``regulator replay`` all get the same bits from the
same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

NAN = math.nan


@dataclass(frozen=True)
class Window:
    """One modality's prime-learning-window decision for one epoch."""

    open: bool
    growth: float  # the statistic the decision came from; NaN when undefined


CLOSED = Window(open=False, growth=NAN)


class Policy(Protocol):
    """A regulation policy for one session's modality order and parameters."""

    name: str

    def window(self, traces: Sequence[Sequence[float]], epoch: int) -> tuple[Window, ...]:
        """Windows of ``epoch`` from the closed epochs' Fisher traces.

        ``traces[m][t]`` is modality m's trace of epoch t, for every t < epoch.
        """
        ...

    def proximal(
        self, window: Sequence[Window], count: int, score_sums: Sequence[float]
    ) -> tuple[float, ...]:
        """Per-modality proximal coefficients of one step."""
        ...


def regulated_fisher(grad_sq: float, grad_delta: float, delta_sq: float, coef: float) -> float:
    """Fisher contribution of the gradient ``g + coef*d`` from the three fused reductions.

    sum((g + a d)^2) = sum(g^2) + 2a sum(g d) + a^2 sum(d^2); a sum of squares, so rounding
    residue below zero is clamped (a NaN stays NaN, and closes the window). With ``coef == 0``
    this is exactly ``grad_sq``.
    """
    if coef == 0.0:
        return grad_sq
    value = grad_sq + 2.0 * coef * grad_delta + coef * coef * delta_sq
    return 0.0 if value < 0.0 else value
