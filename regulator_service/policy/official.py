"""Profile ``official``: the rules of GeWu-Lab/InfoReg_CVPR2025 ``main.py``. On the released run's
own statistics it gives the released code's window statistic k bit for bit at every epoch, regulates
the same modality at every step, and its coefficients agree within 1.2e-7 relative (computed in
float64; training trajectories are not bit-identical under the default arithmetic).

Two modalities; the window is decided from the reference modality's trace history alone (ten
zeros prepended, moving averages of ten) and applies to both; within the window the leading
modality is slowed, with a different gain for the reference and the other modality.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace
from typing import Sequence

from .base import ProximalPolicy, Window
from .paper import GROWTH_WHY
from .spec import MAX_STRENGTH, ProfileError, ProfileSpec, param, quoted

MAX_HISTORY = 10_000
EXACT, RELEASED = "exact", "released"
ARITHMETICS = (EXACT, RELEASED)
_F32 = struct.Struct("<f")


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), as a Python float. A sum, difference
    or product of two float32 values computed in float64 and rounded so is the IEEE float32
    result (float64 carries more than twice float32's precision), so no float32 type is needed."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:  # rounds beyond the largest float32: IEEE gives the infinity
        return math.copysign(math.inf, x)


def exact_coefficient(gain: float, lead: float, other: float) -> float:
    """``gain * exp(tanh(lead - other))`` in float64, as the equations state."""
    return gain * math.exp(math.tanh(lead - other))


def released_coefficient(gain: float, lead: float, other: float) -> float:
    """The same formula in the released code's float32 steps, each rounded to float32: the
    gap of the float32 score sums, its tanh, the exp of that, times the gain as a float32
    (tanh and exp are evaluated in float64 and rounded; the hook, which has torch, re-evaluates
    them as the training device rounds them: see docs/profiles.md)."""
    gap = f32(f32(lead) - f32(other))
    return f32(f32(gain) * f32(math.exp(f32(math.tanh(gap)))))


@dataclass(frozen=True)
class OfficialParams:
    reference_modality: str = param("", "the code's 'audio' modality (empty: the first modality)")
    threshold: float = param(0.05, "the window opens iff k > threshold", low=0.0, high=1.0, high_open=True, why=GROWTH_WHY)
    history: int = param(10, "zeros prepended and moving-average length", low=1, high=MAX_HISTORY)
    reference_gain: float = param(0.95, "beta_ref = gain * exp(tanh(gap))", low=0.0, high=MAX_STRENGTH)
    other_gain: float = param(0.1, "beta_other = gain * exp(tanh(gap))", low=0.0, high=MAX_STRENGTH)
    arithmetic: str = param(
        EXACT, "exact: float64, as the equations state; released: the released code's float32 steps", choices=ARITHMETICS
    )


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
        coefficient = exact_coefficient
        if self.params.arithmetic == RELEASED:  # the released code compares its float32 sums
            s_ref, s_other, coefficient = f32(s_ref), f32(s_other), released_coefficient
        out = [0.0, 0.0]
        if window[ref].open:
            if s_ref > s_other:
                out[ref] = coefficient(self.params.reference_gain, s_ref, s_other)
            elif s_ref < s_other:
                out[other] = coefficient(self.params.other_gain, s_other, s_ref)
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
    summary="the released InfoReg main.py's rules (its window statistic and decisions, in float64): one window from the reference modality's moving average",
    min_modalities=2,
    max_modalities=2,
    check=_resolve_reference,
    oneof="official",
)
