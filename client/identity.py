"""Who is reporting: job, attempt, rank and world size, from arguments or the torchrun
environment (TORCHELASTIC_RUN_ID, TORCHELASTIC_RESTART_COUNT, RANK, WORLD_SIZE)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class JobIdentity:
    job_id: str
    attempt: int
    rank: int
    world_size: int

    @classmethod
    def resolve(
        cls,
        job_id: Optional[str] = None,
        attempt: Optional[int] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> "JobIdentity":
        """Explicit values win; then torch.distributed if initialised; then the environment."""
        env = os.environ if env is None else env
        dist_rank, dist_world = _dist_rank_world()
        job = job_id or env.get("REGULATOR_JOB_ID") or env.get("TORCHELASTIC_RUN_ID")
        if not job:
            raise ValueError(
                "no job id: pass job_id=..., or set REGULATOR_JOB_ID (torchrun sets TORCHELASTIC_RUN_ID)"
            )
        if job == "none" and not job_id and not env.get("REGULATOR_JOB_ID"):
            # torchrun's default --rdzv-id: every job would share one session
            raise ValueError(
                "TORCHELASTIC_RUN_ID is torchrun's default 'none', shared by every job: pass "
                "torchrun --rdzv-id=<unique id> (or --standalone), or set REGULATOR_JOB_ID"
            )
        return cls(
            job_id=job,
            attempt=attempt if attempt is not None else _int(env, "TORCHELASTIC_RESTART_COUNT", 0),
            rank=rank if rank is not None else dist_rank if dist_rank is not None else _int(env, "RANK", 0),
            world_size=world_size
            if world_size is not None
            else dist_world
            if dist_world is not None
            else _int(env, "WORLD_SIZE", 1),
        )


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def _dist_rank_world() -> tuple[Optional[int], Optional[int]]:
    try:
        import torch.distributed as dist
    except ImportError:  # the client works without torch
        return None, None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None, None
