"""JSON encoding of the domain records for persistence.

Floats go through ``repr`` (exact round trip); NaN growth values of closed windows are kept as
the JSON extension ``NaN`` that Python reads back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..model import EpochSummary, Fallback, SessionConfig, StepRecord
from ..policy import BUILTIN_PROFILES, ProfileError, ProfileRegistry, SessionProfile, Window


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True)


def profile_to_dict(profile: SessionProfile) -> dict[str, Any]:
    """``{"name": ..., <parameter>: <value>, ...}``: the layout every stored session has."""
    return {"name": profile.name, **profile.values()}


def profile_from_dict(d: dict[str, Any], profiles: ProfileRegistry = BUILTIN_PROFILES) -> SessionProfile:
    """A stored profile, as it was accepted. A profile this server does not know (a plugin it
    was not started with) is a ``ProfileError`` (a ValueError) naming it."""
    d = dict(d)
    name = d.pop("name")
    if name not in profiles:
        raise ProfileError(
            f"stored profile {name!r} is not known to this server (a plugin profile needs "
            f"`regulator serve --plugin MODULE`); known: {list(profiles.names())}"
        )
    return profiles.get(name).restore(d)


def config_to_json(c: SessionConfig) -> str:
    return dumps(
        {
            "job_id": c.job_id,
            "attempt": c.attempt,
            "world_size": c.world_size,
            "modalities": list(c.modalities),
            "profile": profile_to_dict(c.profile),
            "resume_epoch": c.resume_epoch,
            **({"open_token": c.open_token} if c.open_token else {}),
        }
    )


def config_from_json(s: str, profiles: ProfileRegistry = BUILTIN_PROFILES) -> SessionConfig:
    d = json.loads(s)
    return SessionConfig(
        job_id=d["job_id"],
        attempt=int(d["attempt"]),
        world_size=int(d["world_size"]),
        modalities=tuple(d["modalities"]),
        profile=profile_from_dict(d["profile"], profiles),
        resume_epoch=int(d.get("resume_epoch", 0)),
        open_token=str(d.get("open_token", "")),
    )


def windows_to_list(ws: tuple[Window, ...]) -> list[list[Any]]:
    return [[w.open, w.growth] for w in ws]


def windows_from_list(lst: list[list[Any]]) -> tuple[Window, ...]:
    return tuple(Window(open=bool(o), growth=float(g)) for o, g in lst)


def windows_to_json(ws: tuple[Window, ...]) -> str:
    return dumps(windows_to_list(ws))


def windows_from_json(s: str) -> tuple[Window, ...]:
    return windows_from_list(json.loads(s))


def epoch_to_json(e: EpochSummary) -> str:
    d = dataclasses.asdict(e)
    d["windows"] = windows_to_list(e.windows)
    d["score_sum"] = d.pop("score_mean_sum")  # the stored key of schema 1
    if not d["restored"]:  # observed epochs keep the layout they always had
        del d["restored"]
    return dumps(d)


def epoch_from_json(s: str) -> EpochSummary:
    d = json.loads(s)
    return EpochSummary(
        epoch=int(d["epoch"]),
        windows=windows_from_list(d["windows"]),
        steps=int(d["steps"]),
        fallback_steps=int(d["fallback_steps"]),
        fisher=tuple(d["fisher"]),
        regulated_steps=tuple(int(x) for x in d["regulated_steps"]),
        proximal_sum=tuple(d["proximal_sum"]),
        proximal_max=tuple(d["proximal_max"]),
        score_mean_sum=tuple(d["score_sum"]),
        closed=bool(d["closed"]),
        restored=bool(d.get("restored", False)),
    )


def _floats(xs: tuple[float, ...]) -> str:
    """A JSON array of floats, spelled as ``json.dumps`` spells them (``repr``; NaN and
    Infinity as its extension), without its per-call overhead: one per answered step."""
    text = ",".join(map(repr, xs))
    if "n" in text:  # 'nan' or 'inf': never part of a finite float's repr
        text = ",".join(dumps(x) for x in xs)
    return text


def step_to_json(r: StepRecord) -> str:
    """The step record's JSON, byte for byte what ``dumps`` of the equivalent dict gives (keys
    in this order; grad_scale/noise_scale only for profiles that scale gradients or add noise,
    so older records lack them)."""
    extra = ""
    if r.grad_scale:
        extra += f',"grad_scale":[{_floats(r.grad_scale)}]'
    if r.noise_scale:
        extra += f',"noise_scale":[{_floats(r.noise_scale)}]'
    return (
        f'{{"count":{int(r.count)},"score_sums":[{_floats(r.score_sums)}],"fishers":[{_floats(r.fishers)}],'
        f'"proximal":[{_floats(r.proximal)}],"fallback":{int(r.fallback)},"digest":"{r.digest.hex()}"{extra}}}'
    )


def step_from_json(epoch: int, step: int, s: str) -> StepRecord:
    d = json.loads(s)
    return StepRecord(
        epoch=epoch,
        step=step,
        count=int(d["count"]),
        score_sums=tuple(d["score_sums"]),
        fishers=tuple(d["fishers"]),
        proximal=tuple(d["proximal"]),
        fallback=Fallback(d["fallback"]),
        digest=bytes.fromhex(d["digest"]),
        grad_scale=tuple(d.get("grad_scale", ())),
        noise_scale=tuple(d.get("noise_scale", ())),
    )
