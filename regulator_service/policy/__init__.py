"""Regulation policies: pure functions of a session's history and one step's statistics.

Nothing here knows about gRPC, storage or metrics; every function is testable on plain floats.
"""

from __future__ import annotations

from typing import Union

from .base import CLOSED, Policy, Window
from .none import NoneParams, NonePolicy
from .official import OfficialParams, OfficialPolicy
from .paper import PaperParams, PaperPolicy, gaps, growth_window

ProfileParams = Union[PaperParams, OfficialParams, NoneParams]

PROFILE_NAMES: tuple[str, ...] = ("paper", "official", "none")


def profile_name(params: ProfileParams) -> str:
    if isinstance(params, PaperParams):
        return "paper"
    if isinstance(params, OfficialParams):
        return "official"
    if isinstance(params, NoneParams):
        return "none"
    raise TypeError(f"not a profile: {params!r}")


def build_policy(params: ProfileParams, modalities: tuple[str, ...]) -> Policy:
    """The policy object of a session (immutable; its methods are pure)."""
    if isinstance(params, PaperParams):
        return PaperPolicy(params, modalities)
    if isinstance(params, OfficialParams):
        return OfficialPolicy(params, modalities)
    if isinstance(params, NoneParams):
        return NonePolicy(params, modalities)
    raise TypeError(f"not a profile: {params!r}")


__all__ = [
    "CLOSED",
    "NoneParams",
    "NonePolicy",
    "OfficialParams",
    "OfficialPolicy",
    "PROFILE_NAMES",
    "PaperParams",
    "PaperPolicy",
    "Policy",
    "ProfileParams",
    "Window",
    "build_policy",
    "gaps",
    "growth_window",
    "profile_name",
]
