"""What every regulation policy is: two pure functions over a session's history.

A policy object is built once per session from its (immutable) parameters and modality order and
holds no mutable state, so ``window`` and ``factors`` are pure functions of their arguments:
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


@dataclass(frozen=True)
class StepFactors:
    """One step's answer, per modality in the session's order.

    ``grad_scale`` empty means the policy does not scale gradients (1 everywhere, and the wire
    leaves ``Factors.grad_scale`` absent); ``noise_scale`` empty means no noise (0 everywhere).
    """

    proximal: tuple[float, ...]
    grad_scale: tuple[float, ...] = ()
    noise_scale: tuple[float, ...] = ()


class Policy(Protocol):
    """A regulation policy for one session's modality order and parameters."""

    name: str

    def window(self, traces: Sequence[Sequence[float]], epoch: int) -> tuple[Window, ...]:
        """Windows of ``epoch`` from the closed epochs' Fisher traces.

        ``traces[m][t]`` is modality m's trace of epoch t, for every t < epoch.
        """
        ...

    def factors(
        self, window: Sequence[Window], epoch: int, count: int, score_sums: Sequence[float]
    ) -> StepFactors:
        """The factors of one step of ``epoch`` from its statistics and the epoch's windows."""
        ...


class ProximalPolicy:
    """Mixin for the InfoReg-style policies whose only answer is a proximal coefficient."""

    def proximal(
        self, window: Sequence[Window], count: int, score_sums: Sequence[float]
    ) -> tuple[float, ...]:
        raise NotImplementedError

    def factors(
        self, window: Sequence[Window], epoch: int, count: int, score_sums: Sequence[float]
    ) -> StepFactors:
        return StepFactors(self.proximal(window, count, score_sums))

