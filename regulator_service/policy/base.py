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

