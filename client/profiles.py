"""Building the wire ``Profile`` from a name and keyword parameters, with early, clear errors."""

from __future__ import annotations

from typing import Any, Optional, Union

from inforeg.regulator.v1 import regulator_pb2 as pb

PROFILE_PARAMS: dict[str, tuple[str, ...]] = {
    "paper": ("beta", "threshold", "warmup_epochs"),
    "official": ("reference_modality", "threshold", "history", "reference_gain", "other_gain"),
    "none": (),
}

ProfileLike = Union[str, pb.Profile, None]


def make_profile(name: ProfileLike = "paper", **params: Any) -> pb.Profile:
    """``make_profile("official", reference_modality="audio")`` -> ``pb.Profile``.

    Unset parameters are left to the server's documented defaults.
    """
    if isinstance(name, pb.Profile):
        if params:
            raise ValueError("pass parameters either inside the Profile message or as keywords")
        return name
    name = name or "paper"
    if name not in PROFILE_PARAMS:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILE_PARAMS)}")
    unknown = sorted(set(params) - set(PROFILE_PARAMS[name]))
    if unknown:
        raise ValueError(
            f"profile {name!r} has no parameter(s) {unknown}; it takes {list(PROFILE_PARAMS[name])}"
        )
    given = {k: v for k, v in params.items() if v is not None}
    if name == "paper":
        return pb.Profile(paper=pb.PaperProfile(**given))
    if name == "official":
        return pb.Profile(official=pb.OfficialProfile(**given))
    return pb.Profile(none=pb.NoneProfile())


def profile_name(profile: pb.Profile) -> str:
    return profile.WhichOneof("kind") or "paper"


def profile_params(profile: pb.Profile) -> dict[str, Any]:
    """The parameters set in a (resolved) profile, for logs and results files."""
    kind = profile_name(profile)
    msg: Optional[Any] = getattr(profile, kind)
    return {f.name: v for f, v in msg.ListFields()} if msg is not None else {}
