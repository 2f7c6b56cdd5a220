"""Per-step statistics on the trainer's device, with fused (``torch._foreach_*``) reductions.

Per modality m the regulator needs ``score_sum`` and the step's Fisher contribution of the
gradient the optimizer will apply, ``g + a*d`` with ``d = w - w_anchor``. The coefficient a is
the regulator's answer to this very report, so the probe sends the three reductions
``sum g^2``, ``sum g*d``, ``sum d^2`` (each per weight tensor, divided by its numel) and the
regulator expands ``(g + a d)^2`` itself. Cost per step: three ``_foreach_norm`` over the
encoder weights, one ``_foreach_sub`` and ``_foreach_add``, no Python loop over elements, and
the results stay on the device until the hook's single host sync.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

# Weight matrices and conv kernels enter the Fisher trace; biases and norm layers do not (they
# still receive the proximal term), as in the released InfoReg code.
FISHER_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, _ConvNd)


def fisher_weights(module: nn.Module, kinds: tuple[type[nn.Module], ...] = FISHER_MODULES) -> list[nn.Parameter]:
    """The trainable weight tensors of ``module`` that count towards its Fisher trace."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for sub in module.modules():
        w = getattr(sub, "weight", None)
        if isinstance(sub, kinds) and isinstance(w, nn.Parameter) and w.requires_grad and id(w) not in seen:
            seen.add(id(w))
            out.append(w)
    return out


def score_sums(logits: Sequence[Tensor], labels: Tensor) -> Tensor:
    """Per modality, the batch sum of the true-class softmax probability (float64, on device)."""
    idx = labels.reshape(-1, 1)
    return torch.stack(
        [torch.softmax(lg.detach().float(), dim=1).gather(1, idx).double().sum() for lg in logits]
    )


class EncoderProbe:
    """Anchors, Fisher terms and the proximal update for a set of named encoders."""

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        fisher_modules: tuple[type[nn.Module], ...] = FISHER_MODULES,
    ) -> None:
        self.names = tuple(encoders)
        self.params: list[nn.Parameter] = []
        self.owner: list[int] = []  # modality index of each parameter
        seen: dict[int, str] = {}
        fisher_ids: set[int] = set()
        for m, (name, enc) in enumerate(encoders.items()):
            fisher_ids.update(id(w) for w in fisher_weights(enc, fisher_modules))
            for p in enc.parameters():
                if not p.requires_grad:
                    continue
                if id(p) in seen:
                    raise ValueError(
                        f"encoders {seen[id(p)]!r} and {name!r} share a parameter; each parameter "
                        "must belong to one modality"
                    )
                seen[id(p)] = name
                self.params.append(p)
                self.owner.append(m)
        if not self.params:
            raise ValueError("the encoders have no trainable parameters")
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"all encoder parameters must live on one device, found {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.fisher_idx = [i for i, p in enumerate(self.params) if id(p) in fisher_ids]
        missing = sorted(set(range(len(self.names))) - {self.owner[i] for i in self.fisher_idx})
        if missing:
            raise ValueError(
                f"encoder(s) {[self.names[m] for m in missing]} have no Linear/Conv weight to "
                "estimate a Fisher trace from"
            )
        self._seg = torch.tensor([self.owner[i] for i in self.fisher_idx], device=self.device)
        self._inv_numel = torch.tensor(
            [1.0 / self.params[i].numel() for i in self.fisher_idx], dtype=torch.float64, device=self.device
        )
        self.by_modality = [[i for i, o in enumerate(self.owner) if o == m] for m in range(len(self.names))]
        self.anchors: list[Tensor] = []

    def snapshot(self) -> None:
        """Anchors := current encoder weights (start of an epoch). Encoders only, not the model."""
        with torch.no_grad():
            if self.anchors:
                torch._foreach_copy_(self.anchors, [p.detach() for p in self.params])
            else:
                self.anchors = [p.detach().clone() for p in self.params]

    def deltas(self) -> list[Tensor]:
        """``w - w_anchor`` for every encoder parameter."""
        if not self.anchors:
            raise RuntimeError("no anchors: call snapshot() at the start of the epoch")
        with torch.no_grad():
            return list(torch._foreach_sub([p.detach() for p in self.params], self.anchors))

    def fisher_terms(self, deltas: Sequence[Tensor]) -> Tensor:
        """``[M, 3]`` float64 on device: per modality (sum g^2, sum g*d, sum d^2) / numel, summed
        over weight tensors. A weight without a gradient counts as a zero gradient."""
        with torch.no_grad():
            grads = [
                self.params[i].grad if self.params[i].grad is not None else torch.zeros_like(self.params[i])
                for i in self.fisher_idx
            ]
            ds = [deltas[i] for i in self.fisher_idx]
            f64 = torch.float64
            ng = torch.stack(torch._foreach_norm(grads, 2, dtype=f64))
            nd = torch.stack(torch._foreach_norm(ds, 2, dtype=f64))
            ns = torch.stack(torch._foreach_norm(torch._foreach_add(grads, ds), 2, dtype=f64))
            g2 = ng * ng * self._inv_numel
            d2 = nd * nd * self._inv_numel
            gd = (ns * ns * self._inv_numel - g2 - d2) * 0.5  # polarization: <g, d>
            per_tensor = torch.stack([g2, gd, d2], dim=1)
            out = torch.zeros(len(self.names), 3, dtype=f64, device=self.device)
            return out.index_add_(0, self._seg, per_tensor)

    def apply_proximal(self, coefs: Sequence[float], deltas: Sequence[Tensor]) -> None:
        """``grad += coef_m * (w - w_anchor)`` on every parameter of each regulated encoder."""
        with torch.no_grad():
            for m, a in enumerate(coefs):
                if a == 0.0:
                    continue
                idx = self.by_modality[m]
                with_grad = [i for i in idx if self.params[i].grad is not None]
                if with_grad:
                    torch._foreach_add_(
                        [self.params[i].grad for i in with_grad], [deltas[i] for i in with_grad], alpha=a
                    )
                for i in idx:
                    if self.params[i].grad is None:
                        self.params[i].grad = deltas[i] * a
