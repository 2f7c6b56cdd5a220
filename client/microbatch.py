"""Scores of the micro-batches of one optimizer step (gradient accumulation), for the hook.

With gradient accumulation several forward/backward passes make one optimizer step, and the
regulator must see one report per optimizer step covering every sample of the accumulated
gradient. ``MicroBatchScores`` collects each micro-batch's score sums after its backward and
reports them once, right before the optimizer steps:

    acc = MicroBatchScores(hook)
    for x, y in loader:
        with accelerator.accumulate(model):
            fused, uni = model(x)
            accelerator.backward(loss_fn(fused, y))
            acc.add(uni, y)                       # every micro-batch
            if accelerator.sync_gradients:        # the micro-batch whose step applies
                acc.report()                      # hook.after_backward: one report, all samples
            optimizer.step(); optimizer.zero_grad()

Used by the Hugging Face integration (``regulator_client.hf_trainer``) and the Accelerate recipe
(docs/integrations.md: with ``accelerator.register_for_checkpointing(hook)`` for ``save_state``/
``load_state``, and ``accelerator.log(hook.metrics(), step=...)``); the Lightning callback does
the same in its hooks.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

from torch import Tensor

from .hook import InfoRegHook, StepResult


class MicroBatchScores:
    def __init__(self, hook: InfoRegHook) -> None:
        self.hook = hook
        self._sums: Optional[Tensor] = None
        self._count = 0

    @property
    def pending(self) -> int:
        """Samples collected since the last report."""
        return self._count

    def add(self, logits: Union[Mapping[str, Tensor], Sequence[Tensor]], labels: Tensor) -> None:
        """One micro-batch's unimodal logits and labels (validated by the hook, float64 sums)."""
        local = self.hook.local_scores(logits, labels)[:-1]
        self._sums = local if self._sums is None else self._sums + local
        self._count += int(labels.numel())

    def report(self) -> StepResult:
        """Reports the collected micro-batches as one step and applies the coefficients; call
        after the last backward of the step, before ``optimizer.step()``."""
        if self._sums is None:
            raise RuntimeError("MicroBatchScores.report(): no micro-batch since the last report (call add() after each backward)")
        sums, count = self._sums, self._count
        self._sums, self._count = None, 0
        return self.hook.after_backward(scores=dict(zip(self.hook.modalities, sums.unbind())), count=count)

    def clear(self) -> None:
        """Drops collected scores (an epoch boundary without a step)."""
        self._sums, self._count = None, 0
