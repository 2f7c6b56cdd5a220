"""The official profile's ``released`` coefficients as the training device evaluates them.

The released InfoReg code evaluates ``gain * exp(tanh(s_lead - s_other))`` with torch's float32
``tanh`` and ``exp`` on the training device. The regulator, which has no torch, evaluates them in
float64 rounded to float32; torch's float32 functions are not correctly rounded (the CPU build
differs on about 1% of ``exp``'s inputs, by one ulp), so for the hook to apply the released
code's coefficient bit for bit it re-evaluates the coefficient of the modality the regulator
slowed, on the device, from the step's score sums (see docs/profiles.md).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from .profiles import profile_values
from .stats import RELEASED

log = logging.getLogger("regulator_client")

# The device's value and the regulator's differ only in how tanh and exp round: a few ulps at
# most. A larger difference means the two do not compute the same thing; the regulator wins.
MAX_ULPS = 4


def released_gains(profile: object, modalities: Sequence[str]) -> Optional[tuple[float, ...]]:
    """Each modality's gain under the session's (resolved) ``pb.Profile`` when its parameters
    say ``arithmetic="released"`` and name the two gains (the official profile's); None
    otherwise."""
    values = profile_values(profile) if profile is not None else {}  # type: ignore[arg-type]
    if values.get("arithmetic") != RELEASED or len(modalities) != 2:
        return None
    if "reference_gain" not in values or "other_gain" not in values:
        return None
    ref = values.get("reference_modality") or modalities[0]
    return tuple(values["reference_gain"] if m == ref else values["other_gain"] for m in modalities)


def device_coefficient(gain: float, lead: float, other: float, device: torch.device) -> float:
    """``gain * exp(tanh(lead - other))`` as the released code computes it: float32 tensors on
    ``device``, one operation at a time (the gain enters as a float32)."""
    s = torch.tensor([lead, other], dtype=torch.float32, device=device)
    return float((gain * torch.exp(torch.tanh(s[0] - s[1]))).item())


def _ulps(a: float, b: float) -> int:
    ia, ib = (torch.tensor(x, dtype=torch.float32).view(torch.int32).item() for x in (a, b))
    return abs(int(ia) - int(ib))


def device_proximal(
    proximal: Sequence[float], score_sums: Sequence[float], gains: Sequence[float], device: torch.device
) -> tuple[float, ...]:
    """The regulator's coefficients with each nonzero one re-evaluated on the device."""
    out = list(proximal)
    for m, a in enumerate(proximal):
        if a == 0.0 or len(proximal) != 2:
            continue
        mine = device_coefficient(gains[m], score_sums[m], score_sums[1 - m], device)
        if _ulps(mine, a) > MAX_ULPS:
            log.warning(
                "released arithmetic: the regulator's coefficient %r and the device's %r differ by more than "
                "%d float32 ulps; applying the regulator's", a, mine, MAX_ULPS,
            )
            continue
        out[m] = mine
    return tuple(out)
