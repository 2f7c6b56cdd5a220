"""Getting a step's answer when the regulator is down or slow: the hook's three modes.

- ``wait``: block (reconnecting, ``wait_for_ready``) up to ``wait_timeout`` seconds, then fail
  loudly. The trajectory is exactly the one an uninterrupted run would have had.
- ``neutral``: give up after one ``call_timeout``, apply zero coefficients (plain training),
  and report the step later as ``FALLBACK_NEUTRAL``.
- ``last``: like neutral, but apply the last known coefficients (``FALLBACK_LAST``).

Deferred reports and epoch ends are kept in order and delivered before anything new, so the
regulator's history ends up complete and marks exactly the steps that ran unregulated.

Calls go through a ``RegulatorClient`` (its ``send``) or, for older callers, a bare transport.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

from inforeg.regulator.v1 import regulator_pb2 as pb

from .errors import DeadlineExceeded, Unavailable

log = logging.getLogger(__name__)

MODES = ("wait", "neutral", "last")
TRANSIENT = (Unavailable, DeadlineExceeded)
FALLBACK_OF_MODE = {"neutral": pb.FALLBACK_NEUTRAL, "last": pb.FALLBACK_LAST}
T = TypeVar("T")


class RegulatorUnreachable(Unavailable):
    """``wait`` mode gave up: the regulator did not answer within ``wait_timeout``."""


@dataclass
class DeliveryStats:
    fallback_steps: int = 0
    deferred_epoch_ends: int = 0
    waits: int = 0  # calls that had to wait for the regulator (wait mode)
    waited_s: float = 0.0


@dataclass
class Delivery:
    client: Any  # a RegulatorClient, or a Transport
    mode: str = "wait"
    call_timeout: float = 10.0
    wait_timeout: float = 300.0
    max_pending: int = 1_000_000
    stats: DeliveryStats = field(default_factory=DeliveryStats)
    _pending: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"on_unavailable must be one of {MODES}, got {self.mode!r}")
        if self.call_timeout <= 0 or self.wait_timeout <= 0:
            raise ValueError("call_timeout and wait_timeout must be > 0")

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- sending -------------------------------------------------------------------------------

    def _send(self, req: Union[pb.ReportRequest, pb.EndEpochRequest], timeout: float, wait: bool) -> object:
        send = getattr(self.client, "send", None)
        if send is not None:
            return send(req, timeout=timeout, wait_for_ready=wait)
        if isinstance(req, pb.ReportRequest):
            return self.client.report(req, timeout=timeout, wait_for_ready=wait)
        return self.client.end_epoch(req, timeout=timeout, wait_for_ready=wait)

    def _send_waiting(self, req: Union[pb.ReportRequest, pb.EndEpochRequest]) -> object:
        return self.waiting(lambda timeout: self._send(req, timeout, wait=True), self.call_timeout)

    def waiting(self, call: Callable[[float], T], per_call_timeout: float) -> T:
        """Retries ``call(timeout)`` through unavailability for up to ``wait_timeout`` seconds."""
        start = time.monotonic()
        warned = False
        while True:
            remaining = self.wait_timeout - (time.monotonic() - start)
            if remaining <= 0:
                raise RegulatorUnreachable(
                    f"the regulator did not answer for {self.wait_timeout:.0f}s (mode 'wait'); "
                    "failing instead of training without regulation"
                )
            try:
                resp = call(min(per_call_timeout, remaining))
            except TRANSIENT as exc:
                if not warned:
                    log.warning("regulator unavailable (%s); waiting up to %.0fs", exc.message, self.wait_timeout)
                    warned = True
                time.sleep(min(0.2, max(remaining, 0)))
                continue
            if warned:
                self.stats.waits += 1
                self.stats.waited_s += time.monotonic() - start
                log.warning("regulator back after %.1fs", time.monotonic() - start)
            return resp

    def flush(self) -> bool:
        """Delivers deferred messages in order; False if the regulator is still unreachable."""
        while self._pending:
            try:
                self._send(self._pending[0], self.call_timeout, wait=False)
            except TRANSIENT:
                return False
            self._pending.popleft()
        return True

    def _defer(self, req: Union[pb.ReportRequest, pb.EndEpochRequest]) -> None:
        if len(self._pending) >= self.max_pending:
            raise RegulatorUnreachable(f"{self.max_pending} messages are waiting for the regulator")
        self._pending.append(req)

    # -- the hook's calls ----------------------------------------------------------------------

    def report(self, req: pb.ReportRequest) -> Optional[pb.ReportResponse]:
        """The regulator's answer, or None when the step must fall back (never in wait mode)."""
        if self.mode == "wait":
            return self._send_waiting(req)  # type: ignore[return-value]
        if not self.flush():
            return None
        try:
            return self._send(req, self.call_timeout, wait=False)  # type: ignore[return-value]
        except TRANSIENT:
            return None

    def defer_fallback(
        self,
        req: pb.ReportRequest,
        applied: Sequence[float],
        grad_scale: Sequence[float] = (),
        noise_scale: Sequence[float] = (),
    ) -> pb.ReportRequest:
        """Queues the step as applied without an answer, with the factors that were applied
        (proximal coefficients; scales only where they differ from 1 / 0). Returns the queued
        request: a client that measures the step's Fisher value afterwards adds it there
        (``measured``) before the request is delivered."""
        late = pb.ReportRequest()
        late.CopyFrom(req)
        late.fallback = FALLBACK_OF_MODE[self.mode]
        for i, (stats, coef) in enumerate(zip(late.stats, applied)):
            stats.applied.proximal = coef
            if grad_scale and grad_scale[i] != 1.0:
                stats.applied.grad_scale = grad_scale[i]
            if noise_scale and noise_scale[i] != 0.0:
                stats.applied.noise_scale = noise_scale[i]
        self._defer(late)
        self.stats.fallback_steps += 1
        n = self.stats.fallback_steps
        if n == 1 or n % 100 == 0:
            log.warning(
                "regulator unavailable: step %d ran with %s coefficients (%d fallback steps so far)",
                req.step, "zero" if self.mode == "neutral" else "the last known", n,
            )
        return late

    def end_epoch(self, req: pb.EndEpochRequest) -> Optional[pb.EndEpochResponse]:
        if self.mode == "wait":
            return self._send_waiting(req)  # type: ignore[return-value]
        if self.flush():
            try:
                return self._send(req, self.call_timeout, wait=False)  # type: ignore[return-value]
            except TRANSIENT:
                pass
        self._defer(req)
        self.stats.deferred_epoch_ends += 1
        return None
