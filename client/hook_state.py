"""Where a hook's job stands - shared by its parts - and the training checkpoint made of it.

``HookState`` is the one mutable record the hook's parts (``hook_session``, ``step_exchange``)
read and advance: the job's identity (the attempt is assigned at opening), epoch and step, the
session, the trace being written, the timings. ``checkpoint``/``restore`` are ``state_dict`` and
``load_state_dict``: plain values in, plain values out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from inforeg.regulator.v1 import regulator_pb2 as pb

from . import snapshot as regulation_snapshot
from .identity import JobIdentity
from .step_parts import HookTimings, StepResult
from .trace import TraceWriter

FORMAT = 1


@dataclass
class HookState:
    identity: JobIdentity
    epoch: int = 0
    step: int = 0
    in_epoch: bool = False
    start_epoch: int = 0  # where the session resumes (``start_epoch=``, or a checkpoint's epoch)
    session: Optional[pb.SessionInfo] = None
    history: list[StepResult] = field(default_factory=list)
    # the closed epochs as the regulator answered them, for checkpoints (``snapshot.py``)
    snapshot: Optional[pb.SessionSnapshot] = None
    last_epoch_end: Optional[pb.EndEpochResponse] = None  # for metrics()
    trace: Optional[TraceWriter] = None  # the statistics trace (``record=``), on rank 0
    timings: HookTimings = field(default_factory=HookTimings)

    def require_epoch(self, what: str) -> None:
        if not self.in_epoch:
            raise RuntimeError(f"{what}() outside an epoch: call on_epoch_start() first")


def checkpoint(state: HookState, modalities: Sequence[str]) -> dict[str, Any]:
    """``InfoRegHook.state_dict``: where the job stands, to save in a training checkpoint.

    ``epoch``/``step`` are the numbers of the next epoch and step (after ``on_epoch_end`` the
    epoch has moved on); ``in_epoch`` marks a checkpoint taken inside an epoch. ``snapshot``
    (once a session was opened) holds the session's profile and closed epochs, with which a
    regulator that lost the job - a preempted pod's new sidecar - continues it exactly
    (``snapshot.py``). Plain values only, so ``torch.save``/``torch.load(weights_only=True)``,
    Lightning and a Hugging Face trainer state (JSON) can store it."""
    out: dict[str, Any] = {
        "format": FORMAT,
        "job_id": state.identity.job_id,
        "attempt": state.identity.attempt,
        "modalities": list(modalities),
        "epoch": state.epoch,
        "step": state.step,
        "in_epoch": state.in_epoch,
    }
    if state.snapshot is not None:
        out["snapshot"] = regulation_snapshot.encode(state.snapshot)
    return out


def restore(state: HookState, saved: Mapping[str, Any], modalities: Sequence[str]) -> None:
    """``InfoRegHook.load_state_dict`` on ``state``, before the session opens.

    The session resumes at the checkpoint's epoch and step as the job's next attempt (the
    regulator assigns it, or the saved attempt + 1 when attempts are numbered by hand), and
    that attempt inherits the closed epochs before the checkpoint's epoch, so its windows
    are those of an uninterrupted run - from the regulator's own history, or, on a regulator
    that holds no attempt of the job (a preempted pod's new sidecar), from the checkpoint's
    ``snapshot`` of those epochs, which it restores. A checkpoint taken inside epoch e
    resumes at epoch e: the regulator's record of that epoch then holds only the steps after
    the resume, and ``on_epoch_start`` takes the anchors from the resumed weights."""
    if state.session is not None:
        raise RuntimeError("load_state_dict() must come before open(): the session resumes where the checkpoint stands")
    if saved.get("format") != FORMAT:
        raise ValueError(f"not an InfoRegHook state (format {saved.get('format')!r})")
    if list(saved["modalities"]) != list(modalities):
        raise ValueError(f"the checkpoint's modalities {list(saved['modalities'])} differ from the hook's {list(modalities)}")
    identity = state.identity
    if saved["job_id"] != identity.job_id:
        raise ValueError(
            f"the checkpoint belongs to job {saved['job_id']!r}, this hook to {identity.job_id!r}: "
            "pass the checkpoint's job_id to resume it"
        )
    epoch, step, attempt = int(saved["epoch"]), int(saved["step"]), int(saved["attempt"])
    if epoch < 0 or step < 0:
        raise ValueError(f"bad checkpoint position: epoch {epoch}, step {step}")
    text = saved.get("snapshot")
    loaded = regulation_snapshot.decode(text, modalities) if text else None
    state.start_epoch, state.epoch, state.step, state.in_epoch = epoch, epoch, step, False
    state.history, state.snapshot = [], loaded
    if not getattr(identity, "next_attempt", False) and identity.attempt <= attempt:
        state.identity = dataclasses.replace(identity, attempt=attempt + 1)
