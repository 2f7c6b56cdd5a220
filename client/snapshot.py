"""The regulation state a training checkpoint carries, so that a job continues exactly even when
its regulator starts empty (a preempted pod's new sidecar, on a new emptyDir).

A policy decides every epoch's window from the Fisher traces of the closed epochs before it, so
the closed epochs are all a regulator needs to continue a job - not its steps. The hook keeps
them as the regulator answered its EndEpoch calls (``pb.EpochRecord``), together with the
session's modalities and resolved profile, in one ``pb.SessionSnapshot``; ``InfoRegHook.state_dict``
stores it as text (base64 of the message: exact floats, and plain enough for ``torch.save`` with
``weights_only`` loading, Lightning checkpoints and the JSON of a Hugging Face trainer state).
A resumed hook sends it with its OpenSession; the regulator restores it only if it holds no attempt
of the job, and otherwise checks that it agrees with its own history.
"""

from __future__ import annotations

import base64
import binascii
from typing import Optional, Sequence

from google.protobuf.message import DecodeError

from inforeg.regulator.v1 import regulator_pb2 as pb


def start(modalities: Sequence[str], profile: pb.Profile) -> pb.SessionSnapshot:
    return pb.SessionSnapshot(modalities=list(modalities), profile=profile)


def add_closed(snapshot: pb.SessionSnapshot, closed: pb.EpochRecord) -> None:
    """Appends an epoch as EndEpoch closed it. Only the next epoch in order is kept: after an
    epoch end the regulator did not answer (deferred in a fallback mode) the snapshot stops
    growing, and a checkpoint past it cannot restore a regulator that lost the job."""
    if closed.closed and closed.epoch == len(snapshot.epochs):
        snapshot.epochs.append(closed)


def encode(snapshot: pb.SessionSnapshot) -> str:
    return base64.b64encode(snapshot.SerializeToString(deterministic=True)).decode("ascii")


def decode(text: str, modalities: Sequence[str]) -> pb.SessionSnapshot:
    """The snapshot of a ``state_dict``; ValueError if it is not one of these ``modalities``
    (the regulator validates the rest, as any input)."""
    try:
        snapshot = pb.SessionSnapshot.FromString(base64.b64decode(text.encode("ascii"), validate=True))
    except (binascii.Error, UnicodeEncodeError, DecodeError) as exc:
        raise ValueError(f"the checkpoint's regulation snapshot does not decode: {exc}") from None
    if list(snapshot.modalities) != list(modalities):
        raise ValueError(f"the checkpoint's regulation snapshot is of modalities {list(snapshot.modalities)}, not {list(modalities)}")
    return snapshot


def for_resume(snapshot: Optional[pb.SessionSnapshot], epoch: int) -> Optional[pb.SessionSnapshot]:
    """What an OpenSession resuming at ``epoch`` carries: the closed epochs before it, or None
    when the snapshot does not hold them all (the regulator must then hold the job itself)."""
    if snapshot is None or epoch == 0 or len(snapshot.epochs) < epoch:
        return None
    out = pb.SessionSnapshot()
    out.CopyFrom(snapshot)
    del out.epochs[epoch:]
    return out
