"""A training checkpoint that a retried process resumes from (model, optimizer, schedule, and
where the job stands), written atomically so that a kill at any moment leaves either the old or
the new checkpoint, never half of one.

With it a Kubernetes Job's retried pod continues the job: it resumes at the checkpoint's epoch,
and the regulator's next attempt inherits the closed epochs before it (``resume_epoch``), so
regulation goes on as if the job had never been interrupted. The hook's state (``hook``) carries
those epochs too, so the job continues the same way on a regulator that starts empty (a sidecar
whose state went with the preempted pod).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

FORMAT = 1


@dataclass(frozen=True)
class Checkpoint:
    job_id: str
    epoch: int  # epochs completed: training resumes at this epoch
    step: int  # optimizer steps completed: the next step's number
    settings: Mapping[str, Any]  # what must not change between attempts (views, seed, optimizer)
    model: Mapping[str, Any]
    optimizer: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    hook: Mapping[str, Any] = field(default_factory=dict)  # InfoRegHook.state_dict() ({}: older checkpoints)


def save_checkpoint(path: Union[str, os.PathLike[str]], ckpt: Checkpoint) -> None:
    """Writes ``ckpt`` to a temporary file beside ``path``, fsyncs it and renames it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    payload = {"format": FORMAT, **ckpt.__dict__}
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def load_checkpoint(path: Union[str, os.PathLike[str]], settings: Mapping[str, Any]) -> Optional[Checkpoint]:
    """The checkpoint at ``path`` (None if there is none yet); refuses one written with other
    ``settings``, since resuming it would silently train another model."""
    target = Path(path)
    if not target.exists():
        return None
    payload = torch.load(target, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{target}: checkpoint format {payload.get('format')!r}, expected {FORMAT}")
    payload.pop("format")
    ckpt = Checkpoint(**payload)
    changed = sorted(k for k in set(settings) | set(ckpt.settings) if settings.get(k) != ckpt.settings.get(k))
    if changed:
        diff = ", ".join(f"{k}: {ckpt.settings.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(f"{target} was written by a job with other settings ({diff}); remove it or use another path")
    return ckpt
