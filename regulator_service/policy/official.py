"""Profile ``official``: bit-compatible with GeWu-Lab/InfoReg_CVPR2025 ``main.py``.

Two modalities; the window is decided from the reference modality's trace history alone (ten
zeros prepended, moving averages of ten) and applies to both; within the window the leading
modality is slowed, with a different gain for the reference and the other modality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .base import Window


@dataclass(frozen=True)
class OfficialParams:
    reference_modality: str
    threshold: float = 0.05
    history: int = 10
    reference_gain: float = 0.95
    other_gain: float = 0.1


@dataclass(frozen=True)
class OfficialPolicy:
    params: OfficialParams
    modalities: tuple[str, ...]
    name: str = "official"

    @property
    def _ref(self) -> int:
        return self.modalities.index(self.params.reference_modality)

    def window(self, traces: Sequence[Sequence[float]], epoch: int) -> tuple[Window, ...]:
        n = self.params.history
        if epoch == 0:
            k = 1.0
        else:
            # The released code keeps `[0]*10 + traces` and averages with Python's sum().
            hist = [0.0] * n + list(traces[self._ref][:epoch])
            tr1 = sum(hist[-n:]) / n
            tr2 = sum(hist[-n - 1 : -1]) / n
            k = (tr1 - tr2) / tr1 if tr1 != 0.0 else math.nan
        w = Window(open=k > self.params.threshold, growth=k)
        return tuple(w for _ in self.modalities)

    def proximal(
        self, window: Sequence[Window], count: int, score_sums: Sequence[float]
    ) -> tuple[float, ...]:
        ref = self._ref
        other = 1 - ref
        s_ref, s_other = score_sums[ref], score_sums[other]
        out = [0.0, 0.0]
        if window[ref].open:
            if s_ref > s_other:
                out[ref] = self.params.reference_gain * math.exp(math.tanh(s_ref - s_other))
            elif s_ref < s_other:
                out[other] = self.params.other_gain * math.exp(math.tanh(s_other - s_ref))
        return tuple(out)
