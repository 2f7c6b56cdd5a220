"""Regulation policies: pure functions of a session's history and one step's statistics.

Nothing here knows about gRPC, storage or metrics; every function is testable on plain floats.
Each policy module declares its ``ProfileSpec`` (``spec.py``); ``BUILTIN_PROFILES`` collects
them, and ``ProfileRegistry.with_plugins`` adds a server's plugins.
"""

from __future__ import annotations

from .base import CLOSED, Policy, ProximalPolicy, StepFactors, Window
from .none import NoneParams, NonePolicy
from .official import OfficialParams, OfficialPolicy
from .ogm_ge import OgmGeParams, OgmGePolicy, grad_scales
from .paper import PaperParams, PaperPolicy, gaps, growth_window
from .registry import BUILTIN_PROFILES, PLUGIN_ATTRIBUTE, ProfileRegistry
from .spec import MAX_EPOCH, MAX_STRENGTH, ParamInfo, ProfileError, ProfileSpec, SessionProfile, param

# What a session is configured with (kept under its old name for the domain model).
ProfileParams = SessionProfile


def profile_name(profile: SessionProfile) -> str:
    return profile.name


def build_policy(profile: SessionProfile, modalities: tuple[str, ...]) -> Policy:
    """The policy object of a session (immutable; its methods are pure)."""
    return profile.policy(modalities)


__all__ = [
    "BUILTIN_PROFILES",
    "CLOSED",
    "MAX_EPOCH",
    "MAX_STRENGTH",
    "NoneParams",
    "NonePolicy",
    "OfficialParams",
    "OfficialPolicy",
    "OgmGeParams",
    "OgmGePolicy",
    "PLUGIN_ATTRIBUTE",
    "PaperParams",
    "PaperPolicy",
    "ParamInfo",
    "Policy",
    "ProfileError",
    "ProfileParams",
    "ProfileRegistry",
    "ProfileSpec",
    "ProximalPolicy",
    "SessionProfile",
    "StepFactors",
    "Window",
    "build_policy",
    "gaps",
    "grad_scales",
    "growth_window",
    "param",
    "profile_name",
]
