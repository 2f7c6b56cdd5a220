"""Unimodal logits of a fused classifier, the quantity InfoReg scores each modality by."""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch.nn.functional as F
from torch import Tensor, nn


def concat_unimodal_logits(
    head: nn.Linear, features: Union[Mapping[str, Tensor], Sequence[Tensor]]
) -> Union[dict[str, Tensor], list[Tensor]]:
    """For ``head(cat(f_1..f_M))``, what the head says from each modality alone:
    ``f_m @ W[:, slice_m].T + b / M`` (the released code's ``out_a``/``out_v``).

    Keeps the graph, so the result can feed unimodal loss terms; the hook detaches it.
    """
    items = list(features.items()) if isinstance(features, Mapping) else list(enumerate(features))
    widths = [f.shape[-1] for _, f in items]
    if sum(widths) != head.in_features:
        raise ValueError(
            f"feature widths {widths} sum to {sum(widths)}, the head takes {head.in_features}"
        )
    m = len(items)
    bias = head.bias / m if head.bias is not None else None
    out = []
    start = 0
    for (_, f), w in zip(items, widths):
        out.append(F.linear(f, head.weight[:, start : start + w], bias))
        start += w
    if isinstance(features, Mapping):
        return {k: v for (k, _), v in zip(items, out)}
    return out
