"""Planning an OpenSession: which attempt, which epochs it inherits, whether it supersedes one.

As ``Session`` splits every transition, opening is planned here (validate and build the new
session, touching nothing), then the manager persists the plan and commits it. A rejected
request, or one whose write fails, leaves the server exactly as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Optional

from ..errors import AlreadyExists, DataLoss, FailedPrecondition, ResourceExhausted
from ..model import EpochSummary, Limits, SessionConfig, SessionKey, SessionStatus, SessionView
from ..policy import Window
from ..storage.base import Quarantined
from . import restore
from .accounting import SessionMemory
from .directory import SessionDirectory, quarantine_message
from .session import Session

log = logging.getLogger(__name__)

MAX_ATTEMPT = (1 << 53) - 1  # attempts stay below 2^53, as the wire checks (wire/convert.py MAX_INDEX)


@dataclass(frozen=True)
class OpenPlan:
    """What an OpenSession will do: return the identical open session (``existing``), or create
    ``session`` (superseding ``superseded``, the job's open previous attempt, if any)."""

    config: SessionConfig
    existing: Optional[SessionView] = None
    session: Optional[Session] = None
    window: tuple[Window, ...] = ()
    inherited: tuple[EpochSummary, ...] = ()
    superseded: Optional[Session] = None


class SessionOpener:
    """Plans OpenSession requests; call ``plan`` with the job's lock held."""

    def __init__(self, directory: SessionDirectory, memory: SessionMemory, limits: Limits) -> None:
        self._dir = directory
        self._memory = memory
        self._limits = limits

    def plan(
        self, config: SessionConfig, next_attempt: bool, snapshot: tuple[EpochSummary, ...], now_ms: int
    ) -> OpenPlan:
        job = config.job_id
        self._dir.check_doubt(job)
        latest = self._dir.latest_attempt(job)
        if next_attempt:
            config = self._assigned(config, latest)
        previous: Optional[Session] = None
        quarantined: Optional[Quarantined] = None
        if latest is not None:
            if config.attempt < latest:
                raise FailedPrecondition(
                    f"attempt {config.attempt} of job {job!r} is stale: attempt {latest} is the latest"
                )
            latest_key = SessionKey(job, latest)
            try:
                previous = self._dir.get(latest_key)
            except DataLoss:  # quarantined: a higher attempt starts afresh beside it
                quarantined = self._dir.corrupt.get(latest_key)
                if quarantined is None or config.attempt == latest:
                    raise
            if previous is not None and config.attempt == latest:
                with self._dir.locked(previous):
                    if previous.config != config:
                        raise AlreadyExists(
                            f"job {job!r} attempt {config.attempt} exists with a different "
                            "configuration; use a new job id or a higher attempt"
                        )
                    previous.require_open()
                    if snapshot:
                        restore.check_agrees(job, snapshot, previous.epochs())
                    return OpenPlan(config, existing=previous.view())
        n_open = self._dir.open_count()
        if n_open >= self._limits.max_open_sessions:
            raise ResourceExhausted(f"{n_open} sessions are open, the limit is {self._limits.max_open_sessions}")
        if quarantined is not None and config.resume_epoch and not snapshot:
            raise DataLoss(
                f"cannot resume job {job!r} at epoch {config.resume_epoch}: {quarantine_message(quarantined, resuming=True)}"
            )
        # a quarantined latest attempt holds no epochs that can be read: a checkpoint's snapshot restores them
        inherited = self._inherited(config, previous, snapshot, held=latest is not None and quarantined is None)
        if not self._memory.make_room_for(config, len(inherited)):
            raise ResourceExhausted(self._memory.full_message(self._dir.open_count()))
        session = Session.new(config, now_ms, inherited)
        superseded = previous if previous is not None and previous.status == SessionStatus.OPEN else None
        return OpenPlan(config, None, session, session.view().window, inherited, superseded)

    def _assigned(self, config: SessionConfig, latest: Optional[int]) -> SessionConfig:
        """The attempt after the job's latest (0 for a new job), for a retried process that cannot
        know its number; the latest itself if it was opened with this ``open_token``, so that a
        retried request gets the attempt its first try created (job lock held)."""
        if latest is None:
            return replace(config, attempt=0)
        job, token = config.job_id, config.open_token
        if token and SessionKey(job, latest) not in self._dir.corrupt:
            previous = self._dir.get(SessionKey(job, latest))
            if previous is not None and previous.config.open_token == token:
                return replace(config, attempt=latest)
        if token:
            opened = self._dir.attempt_opened_by(job, token)
            if opened is not None and opened < latest:  # a replay (or a late retry) of a superseded opener
                raise FailedPrecondition(
                    f"open_token {token!r} of job {job!r} is stale: it opened attempt {opened}, which attempt "
                    f"{latest} superseded; attempt {latest} is the live attempt, and this opener must not replace it"
                )
        if latest >= MAX_ATTEMPT:
            raise FailedPrecondition(
                f"job {job!r} has no next attempt: its latest attempt {latest} is the largest allowed (2^53 - 1); "
                "use a new job id"
            )
        return replace(config, attempt=latest + 1)

    def _inherited(
        self, config: SessionConfig, previous: Optional[Session], snapshot: tuple[EpochSummary, ...] = (),
        held: bool = True,
    ) -> tuple[EpochSummary, ...]:
        """The closed epochs an elastic restart resumes after (job lock held): the previous
        attempt's, which the ``snapshot`` must agree with, else - for a job this regulator does
        not hold at all (not ``held``) - the snapshot's."""
        n = config.resume_epoch
        if n == 0:
            return ()
        if previous is None:
            if snapshot and not held:
                restore.check_windows(config, snapshot)  # INVALID_ARGUMENT: another profile's, or altered
                log.info("job %r: no attempt here; restoring its %d closed epoch(s) from its checkpoint", config.job_id, n)
                return snapshot
            hint = "" if snapshot else (
                ", and the request carries no snapshot of its epochs (InfoRegHook.state_dict puts one in a checkpoint)"
            )
            raise FailedPrecondition(f"cannot resume job {config.job_id!r} at epoch {n}: it has no previous attempt{hint}")
        with self._dir.locked(previous):
            prev = previous.config
            if (prev.modalities, prev.profile) != (config.modalities, config.profile):
                raise FailedPrecondition(
                    f"cannot resume job {config.job_id!r}: attempt {prev.attempt} ran other modalities "
                    "or another profile"
                )
            closed = [e for e in previous.epochs() if e.closed]
        if len(closed) < n:
            raise FailedPrecondition(
                f"cannot resume job {config.job_id!r} at epoch {n}: attempt {prev.attempt} closed only "
                f"{len(closed)} epoch(s)"
            )
        if snapshot:
            restore.check_agrees(config.job_id, snapshot, closed[:n])
        return tuple(closed[:n])
