"""Profile ``ogm-ge``: OGM-GE (Peng et al., CVPR 2022) as a peer policy, per
docs/profiles.md "`ogm-ge`: gradient scales instead of a proximal term".

The regulator answers per-modality gradient scales and noise switches; the client multiplies the
selected gradients and draws the noise. No proximal term, no window: windows are reported
closed, and Fisher traces are still recorded for monitoring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from .base import CLOSED, StepFactors, Window
from .spec import MAX_EPOCH, MAX_STRENGTH, ProfileError, ProfileSpec, param


@dataclass(frozen=True)
class OgmGeParams:
    alpha: float = param(0.8, "a slowed modality's scale is 1 - tanh(alpha * ratio)", low=0.0, high=MAX_STRENGTH)
    start_epoch: int = param(0, "first modulated epoch", low=0, high=MAX_EPOCH)
    end_epoch: Optional[int] = param(None, "last modulated epoch, inclusive (unset: unbounded)", low=0, high=MAX_EPOCH)
    noise: bool = param(True, "GE: Gaussian gradient noise on every modality's tensors inside the epoch range")

    def modulates(self, epoch: int) -> bool:
        return self.start_epoch <= epoch and (self.end_epoch is None or epoch <= self.end_epoch)


def ratios(score_sums: Sequence[float]) -> tuple[float, ...]:
    """``ratio_m = s_m / mean(s_o, o != m)``; a zero mean gives inf (s_m > 0) or NaN (s_m = 0),
    which the caller's ``> 1`` test reads as slowed and not slowed."""
    n = len(score_sums)
    out = []
    for i, s in enumerate(score_sums):
        # fsum: correctly rounded, so the mean does not depend on the modality order
        mean = math.fsum(o for j, o in enumerate(score_sums) if j != i) / (n - 1)
        out.append(s / mean if mean > 0.0 else (math.inf if s > 0.0 else math.nan))
    return tuple(out)


def grad_scales(score_sums: Sequence[float], alpha: float) -> tuple[float, ...]:
    """``1 - tanh(alpha * relu(ratio_m))`` for every modality with ``ratio_m > 1``, else 1.
    An exact tie gives ratio 1 and slows nobody."""
    out = []
    for r in ratios(score_sums):
        if r > 1.0:
            out.append(1.0 - math.tanh(alpha * max(r, 0.0)) if alpha > 0.0 else 1.0)
        else:
            out.append(1.0)
    return tuple(out)


@dataclass(frozen=True)
class OgmGePolicy:
    params: OgmGeParams
    modalities: tuple[str, ...]
    name: str = "ogm-ge"

    def window(self, traces: Sequence[Sequence[float]], epoch: int) -> tuple[Window, ...]:
        return tuple(CLOSED for _ in self.modalities)

    def factors(
        self, window: Sequence[Window], epoch: int, count: int, score_sums: Sequence[float]
    ) -> StepFactors:
        n = len(self.modalities)
        zeros = tuple(0.0 for _ in range(n))
        if not self.params.modulates(epoch):
            return StepFactors(zeros, tuple(1.0 for _ in range(n)), zeros)
        noise = 1.0 if self.params.noise else 0.0
        return StepFactors(zeros, grad_scales(score_sums, self.params.alpha), tuple(noise for _ in range(n)))


def _check_range(params: OgmGeParams, modalities: tuple[str, ...]) -> OgmGeParams:
    if params.end_epoch is not None and params.end_epoch < params.start_epoch:
        raise ProfileError(
            f"ogm-ge.end_epoch ({params.end_epoch}) must be >= ogm-ge.start_epoch ({params.start_epoch})"
        )
    return params


SPEC = ProfileSpec(
    name="ogm-ge",
    params=OgmGeParams,
    policy=OgmGePolicy,
    summary="OGM-GE (CVPR 2022) as a peer: the leading modality's gradients scaled by 1 - tanh(alpha * ratio), plus GE noise",
    min_modalities=2,
    check=_check_range,
    oneof="ogm_ge",
)
