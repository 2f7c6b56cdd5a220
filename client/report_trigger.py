"""``ReportTrigger``: starts a step's report when its backward pass begins (``overlap="backward"``).

``loss.backward()`` runs the autograd engine's C++ with the GIL released, so a report thread
started then was meant to run its Python beside the backward pass, instead of taking the GIL from
the training thread's own Python (the loss, the ``backward`` call) as a thread started right after
the forward pass does. Measured, it does not on a step made of small operations: the engine takes
the GIL itself, several times per backward pass, and waits for the report thread's Python each
time (``python -m bench.backward_gil``, docs/performance.md). So it is an option, not a default;
where it fits is a step whose backward pass is long against the report (a large model on a CPU).

The trigger is a one-shot gradient hook on the step's tensors (the encoders' last parameters,
whose gradients come early in the backward pass, and which are in the graph whenever the
encoders are trained - the unimodal logits need not be): the first to fire hands the step to
``start`` (which submits it to the report thread); the hooks return None, so no gradient
changes. If none fires before ``after_backward`` - the encoders were not in the graph, the
forward ran under ``torch.no_grad``, there was no backward pass - ``disarm`` removes the hooks
and the caller reports inline, as without the trigger. Firing or not changes when the report
runs, never what it sends: its content was fixed when the step was sent.

Threads: ``_fire`` runs on the autograd engine's thread (the training thread on a CPU, a device
thread on a GPU, while the training thread waits in ``backward``), ``arm``/``disarm`` on the
training thread; the step is claimed and started under a lock, so it is started at most once, and
once ``disarm`` returns it has either been started (the caller's future is set) or never will be.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar

from torch import Tensor

T = TypeVar("T")


class ReportTrigger(Generic[T]):
    def __init__(self, start: Callable[[T], None]) -> None:
        self._start = start
        self._lock = threading.Lock()
        self._armed: Optional[T] = None
        self._handles: list[Any] = []
        self.fired = 0  # steps started by the backward pass (tests, benchmarks)

    def arm(self, step: T, tensors: Sequence[Tensor]) -> None:
        """Hooks ``tensors`` (those that will get a gradient) for ``step``."""
        self._armed = step
        self._handles = [t.register_hook(self._fire) for t in tensors if t.requires_grad]

    def _fire(self, grad: Tensor) -> None:
        with self._lock:  # started under the lock: ``disarm`` then sees it started
            step, self._armed = self._armed, None
            if step is not None:
                self.fired += 1
                self._start(step)
        return None  # the gradient as it is

    def disarm(self) -> bool:
        """Removes the hooks; whether the step was started by the backward pass (else the
        caller reports it)."""
        with self._lock:
            step, self._armed = self._armed, None
        for h in self._handles:
            h.remove()
        self._handles = []
        return step is None
