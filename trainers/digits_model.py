"""One MLP encoder per view, concat fusion, one linear head."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from regulator_client.heads import concat_unimodal_logits


def mlp_encoder(in_dim: int, hidden: tuple[int, ...] = (256, 256, 128)) -> nn.Sequential:
    """in -> 256 -> 256 -> 128, ReLU after each layer."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    return nn.Sequential(*layers)


class ConcatFusionNet(nn.Module):
    def __init__(self, dims: Mapping[str, int], classes: int = 10, feature_dim: int = 128) -> None:
        super().__init__()
        self.views = tuple(dims)
        self.encoders = nn.ModuleDict({v: mlp_encoder(d, (256, 256, feature_dim)) for v, d in dims.items()})
        self.head = nn.Linear(feature_dim * len(dims), classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, xs: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Fused logits and the per-view unimodal logits (head slice + bias / M)."""
        feats = {v: self.encoders[v](xs[v]) for v in self.views}
        fused = self.head(torch.cat([feats[v] for v in self.views], dim=1))
        return fused, concat_unimodal_logits(self.head, feats)  # type: ignore[return-value]
