"""Profile ``none``: records statistics, never regulates. The monitored baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .base import CLOSED, ProximalPolicy, Window
from .spec import ProfileSpec


@dataclass(frozen=True)
class NoneParams:
    pass


@dataclass(frozen=True)
class NonePolicy(ProximalPolicy):
    params: NoneParams
    modalities: tuple[str, ...]
    name: str = "none"

    def window(self, traces: Sequence[Sequence[float]], epoch: int) -> tuple[Window, ...]:
        return tuple(CLOSED for _ in self.modalities)

    def proximal(
        self, window: Sequence[Window], count: int, score_sums: Sequence[float]
    ) -> tuple[float, ...]:
        return tuple(0.0 for _ in self.modalities)


SPEC = ProfileSpec(
    name="none",
    params=NoneParams,
    policy=NonePolicy,
    summary="records statistics (traces, scores) and answers zeros: the monitored baseline",
    min_modalities=2,
    oneof="none",
)
