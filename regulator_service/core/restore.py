"""Continuing a job from its checkpoint's snapshot (``OpenSessionRequest.snapshot``).

A regulator that holds no attempt of a job - a new sidecar on an empty volume after the pod was
preempted - restores the closed epochs the job's checkpoint carries, so that the job's windows,
which its profile decides from the Fisher traces of the closed epochs, are those of an
uninterrupted run. Restored epochs are marked (``EpochSummary.restored``). A regulator that holds
the job resumes from its own history and only checks that the snapshot agrees with it: it never
overwrites what it recorded.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import FailedPrecondition, InvalidArgument
from ..model import EpochSummary, SessionConfig
from ..policy import Window, build_policy


def same_window(a: Window, b: Window) -> bool:
    """The same decision from the same statistic (an undefined growth, NaN, equals NaN)."""
    return a.open == b.open and (a.growth == b.growth or (a.growth != a.growth and b.growth != b.growth))


def check_windows(config: SessionConfig, epochs: Sequence[EpochSummary]) -> None:
    """Every snapshot epoch's windows are those the session's profile decides from the traces of
    the epochs before it (as the regulator that recorded them did); INVALID_ARGUMENT otherwise,
    since the snapshot then belongs to another profile or was altered."""
    policy = build_policy(config.profile, config.modalities)
    traces: list[list[float]] = [[] for _ in config.modalities]
    for e in epochs:
        expected = policy.window(traces, e.epoch)
        for name, want, got in zip(config.modalities, expected, e.windows):
            if not same_window(want, got):
                raise InvalidArgument(
                    f"the snapshot's window of {name!r} in epoch {e.epoch} (open={got.open}, growth={got.growth!r}) is "
                    f"not what profile {config.profile.name!r} decides from the traces before it (open={want.open}, "
                    f"growth={want.growth!r}): the snapshot belongs to another profile or was altered"
                )
        for tr, f in zip(traces, e.fisher):
            tr.append(f)


def check_agrees(job_id: str, snapshot: Sequence[EpochSummary], held: Sequence[EpochSummary]) -> None:
    """A snapshot sent to a regulator that holds the job must match the epochs it recorded (the
    same traces and windows); FAILED_PRECONDITION otherwise: the checkpoint comes from another
    run that used this job id, and the regulator's history is never overwritten."""
    for s, h in zip(snapshot, held):
        same = s.fisher == h.fisher and all(same_window(a, b) for a, b in zip(s.windows, h.windows))
        if not same:
            raise FailedPrecondition(
                f"cannot resume job {job_id!r}: the checkpoint's epoch {s.epoch} (Fisher traces {list(s.fisher)}) differs "
                f"from the one this regulator recorded ({list(h.fisher)}); the checkpoint belongs to another run "
                "of this job id (use a new job id)"
            )
