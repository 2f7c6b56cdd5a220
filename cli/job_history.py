"""One job's history across its attempts, joined where a resume happened.

A job restarted from a checkpoint opens its next attempt with ``resume_epoch = E``: the new
attempt inherits the closed epochs before ``E`` (their Fisher traces and windows) but records
only its own steps, from epoch ``E`` on. The steps before ``E`` are in the attempt it resumed
from (the job's latest attempt before it), whose steps from ``E`` on were rolled back with the
checkpoint and do not belong to the job's history any more. Walking back while an attempt was a
resume gives the whole history, in step order, as the job's training saw it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.errors import DataLoss, NotFound


@dataclass(frozen=True)
class Segment:
    """The steps one attempt contributed to the job's history, in step order."""

    attempt: int
    steps: tuple[pb.StepRecord, ...]


@dataclass(frozen=True)
class Resume:
    """``attempt`` resumed the job at ``epoch`` (its first epoch)."""

    attempt: int
    epoch: int


@dataclass
class JobHistory:
    session: pb.SessionInfo            # the attempt asked for (default: the latest)
    epochs: list[pb.EpochRecord]       # its epochs, the inherited ones first
    segments: list[Segment]            # oldest attempt first
    resumes: list[Resume]              # where each resume happened, oldest first
    steps_pruned_unix_ms: int = 0      # the asked-for attempt's steps were pruned (retention)
    notes: list[str] = field(default_factory=list)  # what could not be joined, and why

    @property
    def steps(self) -> list[pb.StepRecord]:
        return [s for seg in self.segments for s in seg.steps]

    @property
    def attempts(self) -> list[int]:
        return [seg.attempt for seg in self.segments]


Fetch = Callable[[Optional[int]], pb.GetSessionResponse]  # attempt (None: latest) -> every step


def previous_attempt(client: RegulatorClient, job: str, attempt: int) -> Optional[int]:
    """The attempt ``attempt`` resumed from: the job's latest attempt below it (the server
    inherits from the latest attempt when the next one opens)."""
    known = [s.attempt for s in client.list_sessions(include_inactive=True) if s.job_id == job and s.attempt < attempt]
    if known:
        return max(known)
    return attempt - 1 if attempt > 0 else None  # listed sessions are capped: the usual predecessor


def job_history(client: RegulatorClient, job: str, attempt: Optional[int], fetch: Fetch) -> JobHistory:
    """The history of ``attempt`` (default the latest), joined with the attempts it resumed."""
    detail = fetch(attempt)
    history = JobHistory(
        detail.session, list(detail.epochs), [Segment(detail.session.attempt, tuple(detail.steps))], [],
        detail.steps_pruned_unix_ms,
    )
    current = detail.session
    while current.resume_epoch > 0:
        history.resumes.insert(0, Resume(current.attempt, current.resume_epoch))
        before = previous_attempt(client, job, current.attempt)
        prev, why = None, "no earlier attempt"
        try:
            prev = fetch(before) if before is not None else None
        except (NotFound, DataLoss) as exc:  # expired, deleted or quarantined: plot what is there
            why = exc.message
        if prev is None:
            history.notes.append(
                f"attempt {current.attempt} resumed at epoch {current.resume_epoch}, but the attempt it "
                f"resumed from cannot be read ({why}): its steps are missing from the plot"
            )
            break
        if prev.steps_pruned_unix_ms:
            history.notes.append(f"the steps of attempt {prev.session.attempt} were pruned: missing from the plot")
        kept = tuple(s for s in prev.steps if s.epoch < current.resume_epoch)  # the rest was rolled back
        history.segments.insert(0, Segment(prev.session.attempt, kept))
        current = prev.session
    return history
