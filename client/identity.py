"""Who is reporting: job, attempt, rank and world size, from arguments or the environment
(REGULATOR_JOB_ID / TORCHELASTIC_RUN_ID, REGULATOR_ATTEMPT / TORCHELASTIC_RESTART_COUNT, RANK,
WORLD_SIZE), and how the ranks of a job agree on an attempt the regulator assigns.

The attempt fences a job's restarts: a higher one supersedes the lower. torchrun counts its own
restarts, but a Kubernetes Job retries a failed pod as a new pod whose torchrun starts again at 0,
so a process that cannot know its attempt asks the regulator for "the next attempt"
(``OpenSessionRequest.next_attempt``); under DDP the job's leader asks and the other ranks learn
the number through the process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional, Union

NEXT = "next"  # attempt= / REGULATOR_ATTEMPT value: the regulator assigns the attempt
AttemptLike = Union[int, str, None]


@dataclass(frozen=True)
class JobIdentity:
    job_id: str
    attempt: int
    rank: int
    world_size: int
    # The regulator assigns ``attempt`` at OpenSession (``attempt`` is 0 until then).
    next_attempt: bool = False

    @classmethod
    def resolve(
        cls,
        job_id: Optional[str] = None,
        attempt: AttemptLike = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> "JobIdentity":
        """Explicit values win; then torch.distributed if initialised; then the environment.

        The attempt: ``attempt`` (a number, or ``"next"``), else ``REGULATOR_ATTEMPT`` (the same),
        else torchrun's ``TORCHELASTIC_RESTART_COUNT``, else ``"next"`` when the job can agree on
        an assigned number (one process, or torch.distributed initialised), else 0."""
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
        rank = rank if rank is not None else dist_rank if dist_rank is not None else _int(env, "RANK", 0)
        world = world_size if world_size is not None else dist_world if dist_world is not None else _int(env, "WORLD_SIZE", 1)
        can_agree = world == 1 or dist_world is not None
        chosen = _attempt(attempt, "attempt")
        if chosen is None and env.get("REGULATOR_ATTEMPT"):
            chosen = _attempt(env["REGULATOR_ATTEMPT"], "REGULATOR_ATTEMPT")
        if chosen is None and env.get("TORCHELASTIC_RESTART_COUNT"):
            chosen = _int(env, "TORCHELASTIC_RESTART_COUNT", 0)
        if chosen is None:
            chosen = NEXT if can_agree else 0
        if chosen == NEXT and not can_agree:
            raise ValueError(
                f"attempt {NEXT!r} with world size {world} needs torch.distributed initialised, so "
                "that the leader can share the attempt the regulator assigns; pass a number instead"
            )
        if chosen == NEXT:
            return cls(job, 0, rank, world, next_attempt=True)
        return cls(job, int(chosen), rank, world)

    def assigned(self, attempt: int) -> "JobIdentity":
        """This identity with the attempt the regulator assigned."""
        return replace(self, attempt=attempt, next_attempt=False)


def _attempt(value: AttemptLike, source: str) -> AttemptLike:
    """A validated attempt: None, ``"next"`` or an integer >= 0."""
    if value is None or value == NEXT:
        return value
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{source}={value!r}: expected an integer >= 0 or {NEXT!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{source}={value!r}: expected an integer >= 0 or {NEXT!r}")
    return value


def agree_on_attempt(
    open_next: Callable[[], int], *, distributed: bool, process_group: Any = None, device: Any = None
) -> int:
    """The attempt the regulator assigns. Alone, ``open_next()``. ``distributed``: the leader (rank
    0 of ``process_group``, default the world) calls it and the other ranks receive the number in
    one broadcast (-1 if the leader failed: then they fail too instead of hanging in a collective)."""
    if not distributed:
        return open_next()
    import torch
    import torch.distributed as dist

    leader = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    box = torch.tensor([-1], dtype=torch.int64, device=device)
    failure: Optional[BaseException] = None
    if dist.get_rank() == leader:
        try:
            box.fill_(open_next())
        except BaseException as exc:  # tell the other ranks before raising
            failure = exc
    dist.broadcast(box, src=leader, group=process_group)
    if failure is not None:
        raise failure
    attempt = int(box.item())
    if attempt < 0:
        raise RuntimeError("the job's leader could not open the next attempt at the regulator (see its log)")
    return attempt


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def _initialised_dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:  # the client works without torch
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def _dist_rank_world() -> tuple[Optional[int], Optional[int]]:
    dist = _initialised_dist()
    if dist is not None:
        return dist.get_rank(), dist.get_world_size()
    return None, None
