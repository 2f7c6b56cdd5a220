"""Per-step work on the trainer's device: scores, applying the regulator's factors, and the
Fisher value of the gradient the optimizer applies. No host sync anywhere in here.

Per modality m the regulator answers ``Factors{proximal a, grad_scale k, noise_scale n}``; the
probe applies them to the encoder's gradients, in this order:

- ``grad = grad * k + N(0, n * (std(grad) + 1e-8))`` on the *scaled* tensors (OGM-GE; default:
  the 4-D weight tensors, as the released OGM-GE code), ``std`` of the gradient before scaling;
- ``grad += a * (w - w_anchor)`` on the *proximal* tensors (InfoReg; default: every parameter of
  the encoder, as the released InfoReg code), ``w_anchor`` the weights at the epoch's start.

Nothing is computed for a modality whose factors are neutral (``a == 0``, ``k == 1``, ``n == 0``):
no ``w - w_anchor`` deltas, no extra pass. The official profile's ``released`` arithmetic
instead does what the released InfoReg code does: the proximal term with the product rounded
on its own (``d = w - w_anchor``, ``d = a * d``, ``grad = grad + d``, each rounded to float32;
``exact`` fuses the last two into one rounding) and, on
every modality whose coefficient is 0, ``grad += 0 * (w - w_anchor)`` (which turns a ``-0.0``
gradient into ``+0.0`` where the weight has not moved down); its score sums add the batch's
probabilities one by one in float32 (see docs/profiles.md).

Then the Fisher value: per modality
``sum over weight tensors W of sum(grad(W)**2) / numel(W)`` of the final gradient, one pass per
tensor, each tensor reduced in float32 (the released InfoReg code accumulates its Fisher
information in float32 too) and the per-tensor results summed in float64; ``fisher_dtype=
torch.float64`` reduces every tensor in float64 instead (about 5x slower on a CPU).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .profiles import profile_values

# Weight matrices and conv kernels enter the Fisher trace; biases and norm layers do not (they
# still receive the proximal term), as in the released InfoReg code.
FISHER_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, _ConvNd)

# Which parameters of an encoder get a factor: a name, or a predicate (name, parameter) -> bool.
Selector = Union[str, Callable[[str, nn.Parameter], bool]]
SELECTORS = ("all", "weights", "conv")
DEFAULT_PROXIMAL: Selector = "all"  # InfoReg: grad += a (w - w_anchor) on every encoder parameter
DEFAULT_SCALE: Selector = "conv"  # OGM-GE: only the 4-D (convolution) weight tensors
NOISE_EPS = 1e-8  # OGM-GE: N(0, std(grad) + 1e-8)
EXACT, RELEASED = "exact", "released"  # the official profile's `arithmetic` parameter


def arithmetic_of(profile: object) -> str:
    """The arithmetic a session's ``pb.Profile`` asks of the probe: ``released`` only for a
    profile whose ``arithmetic`` parameter says so (the official profile declares it)."""
    values = profile_values(profile) if profile is not None else {}  # type: ignore[arg-type]
    return RELEASED if values.get("arithmetic") == RELEASED else EXACT


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


def score_sums(logits: Sequence[Tensor], labels: Tensor, *, released: bool = False) -> Tensor:
    """Per modality, the batch sum of the true-class softmax probability (float64, on device):
    probabilities in float32, summed in float64; all modalities in one pass when they agree in
    shape (they do for a shared head's unimodal logits). ``released``: summed in float32, one
    sample after the other in batch order, as the released InfoReg code sums them."""
    if released:
        return _sequential_float32_sums(logits, labels)
    if len({tuple(lg.shape) for lg in logits}) == 1:
        stacked = torch.stack([lg.detach() for lg in logits]).float()  # [M, B, C]
        idx = labels.reshape(1, -1, 1).expand(len(logits), -1, 1)
        return torch.softmax(stacked, dim=2).gather(2, idx).squeeze(2).double().sum(1)
    idx = labels.reshape(-1, 1)
    return torch.stack(
        [torch.softmax(lg.detach().float(), dim=1).gather(1, idx).double().sum() for lg in logits]
    )


def _sequential_float32_sums(logits: Sequence[Tensor], labels: Tensor) -> Tensor:
    """``((p_0 + p_1) + p_2) + ...`` in float32 per modality (no host sync: one small add per
    sample), returned as float64 (exactly the float32 values)."""
    idx = labels.reshape(-1, 1)
    probs = torch.stack([torch.softmax(lg.detach().float(), dim=1).gather(1, idx).squeeze(1) for lg in logits])
    if probs.shape[1] == 0:
        return torch.zeros(len(logits), dtype=torch.float64, device=probs.device)
    total = probs[:, 0].clone()
    for i in range(1, probs.shape[1]):
        total += probs[:, i]
    return total.double()


def noise_seed(job_id: str, step: int, index: int) -> int:
    """The seed of parameter ``index``'s gradient noise at ``step``: the same on every rank of a
    job, and independent of anything else the process does with random numbers."""
    digest = hashlib.blake2b(f"{job_id}\x00{step}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _selector(sel: Selector, fisher_ids: set[int]) -> Callable[[str, nn.Parameter], bool]:
    if callable(sel):
        return sel
    if sel == "all":
        return lambda name, p: True
    if sel == "weights":  # the weights of Linear/Conv layers: the tensors of the Fisher trace
        return lambda name, p: id(p) in fisher_ids
    if sel == "conv":  # the released OGM-GE code: len(grad.size()) == 4
        return lambda name, p: p.dim() == 4
    raise ValueError(f"parameter selector {sel!r}: use one of {SELECTORS} or a function (name, param) -> bool")


def per_modality(value: Union[Selector, Mapping[str, Selector]], names: Sequence[str], what: str) -> list[Selector]:
    """One selector for every modality, or a mapping modality -> selector (others: the default)."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{what} names unknown modalities {unknown}; the encoders are {list(names)}")
        default = DEFAULT_PROXIMAL if what == "proximal_params" else DEFAULT_SCALE
        return [value.get(n, default) for n in names]
    return [value for _ in names]


class EncoderProbe:
    """Anchors, factor application and the Fisher measurement for a set of named encoders."""

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        fisher_modules: tuple[type[nn.Module], ...] = FISHER_MODULES,
        *,
        proximal_params: Union[Selector, Mapping[str, Selector]] = DEFAULT_PROXIMAL,
        scale_params: Union[Selector, Mapping[str, Selector]] = DEFAULT_SCALE,
        fisher_dtype: torch.dtype = torch.float32,
        arithmetic: str = EXACT,
    ) -> None:
        if fisher_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"fisher_dtype must be torch.float32 or torch.float64, got {fisher_dtype}")
        if arithmetic not in (EXACT, RELEASED):
            raise ValueError(f"arithmetic must be {EXACT!r} or {RELEASED!r}, got {arithmetic!r}")
        self.arithmetic = arithmetic
        self.names = tuple(encoders)
        self.fisher_dtype = fisher_dtype
        self.params: list[nn.Parameter] = []
        self.owner: list[int] = []  # modality index of each parameter
        prox_sel = per_modality(proximal_params, self.names, "proximal_params")
        scale_sel = per_modality(scale_params, self.names, "scale_params")
        self.proximal_idx: list[list[int]] = [[] for _ in self.names]
        self.scale_idx: list[list[int]] = [[] for _ in self.names]
        seen: dict[int, str] = {}
        fisher_ids: set[int] = set()
        for m, (name, enc) in enumerate(encoders.items()):
            weights = {id(w) for w in fisher_weights(enc, fisher_modules)}
            fisher_ids |= weights
            takes_prox, takes_scale = _selector(prox_sel[m], weights), _selector(scale_sel[m], weights)
            for pname, p in enc.named_parameters():
                if not p.requires_grad:
                    continue
                if id(p) in seen:
                    raise ValueError(
                        f"encoders {seen[id(p)]!r} and {name!r} share a parameter; each parameter "
                        "must belong to one modality"
                    )
                seen[id(p)] = name
                i = len(self.params)
                self.params.append(p)
                self.owner.append(m)
                if takes_prox(pname, p):
                    self.proximal_idx[m].append(i)
                if takes_scale(pname, p):
                    self.scale_idx[m].append(i)
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
        # [T, M]: weight tensor t's 1/numel in its modality's column, so that one matmul turns the
        # per-tensor sums of squares into the per-modality Fisher values
        self._to_modality = torch.zeros(len(self.fisher_idx), len(self.names), dtype=torch.float64, device=self.device)
        for t, i in enumerate(self.fisher_idx):
            self._to_modality[t, self.owner[i]] = 1.0 / self.params[i].numel()
        self._fisher_params = [self.params[i] for i in self.fisher_idx]
        # CPU float32: a BLAS dot per tensor is both faster and more accurate than _foreach_norm
        self._dot = self.device.type == "cpu" and all(self.params[i].dtype == torch.float32 for i in self.fisher_idx)
        self._generator: Optional[torch.Generator] = None
        self.anchors: list[Tensor] = []

    def first_grads(self) -> list[nn.Parameter]:
        """Per encoder, its last parameter: usually its output layer's, whose gradient comes
        first in the backward pass (``ReportTrigger``)."""
        last = {m: i for i, m in enumerate(self.owner)}
        return [self.params[last[m]] for m in sorted(last)]

    # -- anchors ------------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Anchors := current encoder weights (start of an epoch). Encoders only, not the model."""
        with torch.no_grad():
            if self.anchors:
                torch._foreach_copy_(self.anchors, [p.detach() for p in self.params])
            else:
                self.anchors = [p.detach().clone() for p in self.params]

    def anchor_state(self) -> list[Tensor]:
        return [a.clone() for a in self.anchors]

    def load_anchor_state(self, anchors: Sequence[Tensor]) -> None:
        if len(anchors) != len(self.params) or any(a.shape != p.shape for a, p in zip(anchors, self.params)):
            raise ValueError("the saved anchors do not match these encoders' parameters")
        self.anchors = [a.detach().to(device=p.device, dtype=p.dtype).clone() for a, p in zip(anchors, self.params)]

    # -- factors ------------------------------------------------------------------------------

    def apply(
        self,
        proximal: Sequence[float],
        grad_scale: Sequence[float] = (),
        noise_scale: Sequence[float] = (),
        seed: Optional[Callable[[int], int]] = None,
    ) -> None:
        """Applies one step's factors to the encoders' gradients (see the module docstring).
        ``seed(i)`` seeds parameter i's noise (required when any ``noise_scale`` is > 0)."""
        if not self.anchors and any(a != 0.0 for a in proximal):
            raise RuntimeError("no anchors: call snapshot() at the start of the epoch")
        with torch.no_grad():
            for m, a in enumerate(proximal):
                k = grad_scale[m] if grad_scale else 1.0
                n = noise_scale[m] if noise_scale else 0.0
                if k != 1.0 or n > 0.0:
                    self._scale(self.scale_idx[m], k, n, seed)
                if self.arithmetic == RELEASED:
                    if a != 0.0 or self.anchors:
                        self._proximal_released(self.proximal_idx[m], a)
                elif a != 0.0:
                    self._proximal(self.proximal_idx[m], a)

    def _scale(self, idx: Sequence[int], k: float, n: float, seed: Optional[Callable[[int], int]]) -> None:
        """``grad = grad * k + N(0, n * (std(grad) + 1e-8))``, std before scaling (OGM-GE)."""
        idx = [i for i in idx if self.params[i].grad is not None]
        if not idx:
            return
        grads = [self.params[i].grad for i in idx]
        stds: list[Tensor] = []
        if n > 0.0:
            if seed is None:
                raise ValueError("gradient noise needs a seed function")
            stds = [
                (g.std() if g.numel() > 1 else torch.zeros((), dtype=g.dtype, device=g.device)).add_(NOISE_EPS).mul_(n)
                for g in grads  # type: ignore[union-attr]
            ]
        if k != 1.0:
            torch._foreach_mul_(grads, k)  # type: ignore[arg-type]
        if n > 0.0:
            gen = self._noise_generator()
            noise = []
            for i, g in zip(idx, grads):
                gen.manual_seed(seed(i))  # type: ignore[misc]
                noise.append(torch.randn(g.shape, generator=gen, dtype=g.dtype, device=g.device))  # type: ignore[union-attr]
            torch._foreach_addcmul_(grads, noise, stds)  # type: ignore[arg-type]

    def _proximal(self, idx: Sequence[int], a: float) -> None:
        """``grad += a * (w - w_anchor)``; a parameter without a gradient gets ``a * (w - w_anchor)``."""
        params = [self.params[i] for i in idx]
        deltas = torch._foreach_sub(params, [self.anchors[i] for i in idx])  # under no_grad
        with_grad = [j for j, p in enumerate(params) if p.grad is not None]
        if len(with_grad) == len(params):
            torch._foreach_add_([p.grad for p in params], deltas, alpha=a)  # type: ignore[misc]
            return
        for j, (p, d) in enumerate(zip(params, deltas)):
            if p.grad is None:
                p.grad = d.mul_(a)
            else:
                p.grad.add_(d, alpha=a)

    def _proximal_released(self, idx: Sequence[int], a: float) -> None:
        """The released code's ``grad += a * (w - w_anchor)``: ``w - w_anchor``, times ``a``,
        added to the gradient, each rounded; with ``a == 0`` too (it can turn -0.0 into +0.0).
        A parameter without a gradient gets ``a * (w - w_anchor)`` when ``a != 0``."""
        if not idx:
            return
        params = [self.params[i] for i in idx]
        deltas = torch._foreach_sub(params, [self.anchors[i] for i in idx])  # under no_grad
        torch._foreach_mul_(deltas, a)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_add_(grads, [d for p, d in zip(params, deltas) if p.grad is not None])  # type: ignore[arg-type]
        if a != 0.0:
            for p, d in zip(params, deltas):
                if p.grad is None:
                    p.grad = d

    def _noise_generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=self.device)
        return self._generator

    # -- Fisher -------------------------------------------------------------------------------

    def fisher(self) -> Tensor:
        """``[M]`` float64 on the device: per modality, sum over weight tensors of
        ``sum(grad**2) / numel`` of the gradients as they are now. A weight without a gradient
        contributes 0."""
        with torch.no_grad():
            grads = [p.grad for p in self._fisher_params]
            to_modality = self._to_modality
            if any(g is None for g in grads):
                keep = [j for j, g in enumerate(grads) if g is not None]
                if not keep:
                    return torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
                grads, to_modality = [grads[j] for j in keep], to_modality[keep]
            if self.fisher_dtype == torch.float64:
                sq = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square_()  # type: ignore[arg-type]
            elif self._dot:
                flat = [g.reshape(-1) for g in grads]  # type: ignore[union-attr]
                sq = torch.stack([torch.dot(f, f) for f in flat]).double()
            else:  # CUDA: one fused kernel over all tensors; float32 accumulation in a tree
                sq = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).double().square_()  # type: ignore[arg-type]
            return sq @ to_modality
