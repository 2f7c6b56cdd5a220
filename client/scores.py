"""A step's scores as the hook takes them: per-modality logits with labels, or ready score sums
with a count, validated and reduced on the encoders' device (no host sync but a given count's)."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .stats import score_sums

Logits = Union[Mapping[str, Tensor], Sequence[Tensor], None]
Scores = Union[Mapping[str, Union[float, Tensor]], None]


def step_scores(
    modalities: Sequence[str], device: torch.device, logits: Logits, labels: Optional[Tensor], *,
    scores: Scores = None, count: Optional[int] = None, released: bool = False,
) -> tuple[Tensor, float]:
    """``([s_1..s_M] float64 on device, count)`` of this process's batch. A mapping is read by
    key, in ``modalities``' order, whatever order it was built in."""
    if logits is not None:
        if labels is None:
            raise ValueError("labels are required with logits")
        if isinstance(logits, Mapping):
            if set(logits) != set(modalities):
                raise ValueError(f"logits for {sorted(logits)}, expected {sorted(modalities)}")
            seq = [logits[m] for m in modalities]
        else:
            seq = list(logits)
            if len(seq) != len(modalities):
                raise ValueError(f"{len(seq)} logits for {len(modalities)} modalities")
        return score_sums(seq, labels, released=released).to(device), float(labels.numel())
    if scores is None or count is None:
        raise ValueError("pass logits and labels, or scores and count")
    if set(scores) != set(modalities):
        raise ValueError(f"scores for {sorted(scores)}, expected {sorted(modalities)}")
    vals = [torch.as_tensor(scores[m], dtype=torch.float64, device=device).reshape(()) for m in modalities]
    return torch.stack(vals), float(count)


def with_count(sums: Tensor, count: float) -> Tensor:
    """``[s_1..s_M, count]``: the form summed over a job's ranks (and ``InfoRegHook.local_scores``)."""
    return torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=sums.device)])
