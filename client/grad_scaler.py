"""fp16 mixed precision: whether ``torch.amp.GradScaler`` will skip the step the hook is about to
regulate (a skipped step is neither regulated, reported nor counted)."""

from __future__ import annotations

from typing import Any


def scaler_skips(scaler: Any, optimizer: Any) -> bool:
    """Unscales the optimizer's gradients (unless the loop did), so that the hook reads true
    values, and says whether the scaler found inf/NaN in them."""
    if scaler is None or not scaler.is_enabled():
        return False
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("scaler.step(optimizer) ran before after_backward(): the hook must see the step's gradients first")
    if state["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    return sum(v.item() for v in state["found_inf_per_device"].values()) > 0
