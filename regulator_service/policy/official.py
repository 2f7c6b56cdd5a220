"""Profile ``official``: bit-compatible with GeWu-Lab/InfoReg_CVPR2025 ``main.py``.

Two modalities; the window is decided from the reference modality's trace history alone (ten
zeros prepended, moving averages of ten) and applies to both; within the window the leading
modality is slowed, with a different gain for the reference and the other modality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from .base import ProximalPolicy, Window
from .paper import GROWTH_WHY
from .spec import MAX_STRENGTH, ProfileError, ProfileSpec, param, quoted

MAX_HISTORY = 10_000


@dataclass(frozen=True)
class OfficialParams:
    reference_modality: str = param("", "the code's 'audio' modality (empty: the first modality)")
    threshold: float = param(0.05, "the window opens iff k > threshold", low=0.0, high=1.0, high_open=True, why=GROWTH_WHY)
    history: int = param(10, "zeros prepended and moving-average length", low=1, high=MAX_HISTORY)
    reference_gain: float = param(0.95, "beta_ref = gain * exp(tanh(gap))", low=0.0, high=MAX_STRENGTH)
    other_gain: float = param(0.1, "beta_other = gain * exp(tanh(gap))", low=0.0, high=MAX_STRENGTH)


@dataclass(frozen=True)
class OfficialPolicy(ProximalPolicy):
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


def _resolve_reference(params: OfficialParams, modalities: tuple[str, ...]) -> OfficialParams:
    """The reference defaults to the first modality and must be one of the session's."""
    ref = params.reference_modality or modalities[0]
    if ref not in modalities:
        raise ProfileError(f"official.reference_modality {quoted(ref)} is not one of {list(modalities)}")
    return replace(params, reference_modality=ref)


SPEC = ProfileSpec(
    name="official",
    params=OfficialParams,
    policy=OfficialPolicy,
    summary="bit-compatible with the released InfoReg main.py: one window from the reference modality's moving average",
    min_modalities=2,
    max_modalities=2,
    check=_resolve_reference,
    oneof="official",
)
