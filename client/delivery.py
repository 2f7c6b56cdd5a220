"""Getting a step's answer when the regulator is down or slow: the hook's three modes.

- ``wait``: block (reconnecting, ``wait_for_ready``) up to ``wait_timeout`` seconds, then fail
  loudly. The trajectory is exactly the one an uninterrupted run would have had.
- ``neutral``: give up after one ``call_timeout``, apply zero coefficients (plain training),
  and report the step later as ``FALLBACK_NEUTRAL``.
- ``last``: like neutral, but apply the last known coefficients (``FALLBACK_LAST``).

In the fallback modes a regulator that did not answer is not asked again at every step: while
messages wait, the next try comes after a pause that doubles from ``QUIET_S[0]`` to
``QUIET_S[1]`` seconds, and the steps in between fall back at once. Without it every step of a
job whose regulator is down (or too slow) would spend a whole ``call_timeout`` on gRPC's
reconnect retries.

Deferred reports and epoch ends are kept in order and delivered before anything new, so the
regulator's history ends up complete and marks exactly the steps that ran unregulated.

Whatever the mode, a call that waits for the regulator is named while it waits: a warning with
the target, the call and how long it will keep trying, again every ``warn_every_s`` seconds
(``Patience``), so a job pointed at a dead address says so at once.

Calls go through a ``RegulatorClient`` (its ``send``) or, for older callers, a bare transport.
"""

from __future__ import annotations

import logging
import threading
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
QUIET_S = (0.5, 5.0)  # first and longest pause before a fallback mode asks a silent regulator again
T = TypeVar("T")


class RegulatorUnreachable(Unavailable):
    """``wait`` mode gave up: the regulator did not answer within ``wait_timeout``."""


def target_of(client: Any) -> str:
    """Where the calls go, for messages: the client's (or transport's) target."""
    return str(getattr(client, "target", None) or getattr(getattr(client, "transport", None), "target", None) or "the regulator")


class Patience:
    """Warns from a timer thread while a call waits for the regulator: ``first_s`` after
    ``start()``, then every ``every_s``. A thread, because the call itself may block for its whole
    deadline on a connection that never comes (``wait_for_ready``); the call's own deadlines stay
    as they are."""

    def __init__(self, target: str, what: str, budget_s: float, then: str, every_s: float) -> None:
        self.target, self.what, self.budget_s, self.then, self.every_s = target, what, budget_s, then, every_s
        self.began = time.monotonic()
        self.last_error = ""
        self.failures = 0
        self.warnings = 0
        self._done: Optional[threading.Event] = None  # with the thread: a call that is answered at once costs neither
        self._thread: Optional[threading.Thread] = None

    def start(self, first_s: float) -> None:
        if self._thread is None:
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(first_s, self._done), name="inforeg-patience", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._done.set()  # type: ignore[union-attr]
            self._thread.join()

    def _run(self, delay: float, done: threading.Event) -> None:
        while not done.wait(delay):
            self.warn()
            delay = self.every_s

    def warn(self) -> None:
        waited = time.monotonic() - self.began
        self.warnings += 1
        log.warning(
            "regulator at %s does not answer: %s has waited %.1fs%s; retrying for up to %.1fs more, then %s",
            self.target, self.what, waited, f" ({self.last_error})" if self.last_error else "",
            max(self.budget_s - waited, 0.0), self.then,
        )


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
    warn_every_s: float = 15.0  # how often a waiting call is named again (the first after min(5 s, this))
    stats: DeliveryStats = field(default_factory=DeliveryStats)
    _pending: deque = field(default_factory=deque)
    _on_open: Optional[Callable[[Any], None]] = None  # a deferred OpenSession's continuation
    _attempt: Optional[int] = None  # the attempt a deferred OpenSession was assigned
    clock: Callable[[], float] = time.monotonic  # for the pause after a call without an answer
    _quiet_s: float = 0.0  # the current pause after a call without an answer (0: none)
    _quiet_until: float = 0.0  # monotonic time before which fallback modes do not call

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"on_unavailable must be one of {MODES}, got {self.mode!r}")
        if self.call_timeout <= 0 or self.wait_timeout <= 0 or self.warn_every_s <= 0:
            raise ValueError("call_timeout, wait_timeout and warn_every_s must be > 0")

    @property
    def target(self) -> str:
        return target_of(self.client)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- sending -------------------------------------------------------------------------------

    def _send(self, req: Union[pb.OpenSessionRequest, pb.ReportRequest, pb.EndEpochRequest], timeout: float, wait: bool) -> object:
        if self._attempt is not None and not isinstance(req, pb.OpenSessionRequest):
            req.attempt = self._attempt  # queued before a deferred OpenSession learnt the attempt
        send = getattr(self.client, "send", None)
        if send is not None:
            return send(req, timeout=timeout, wait_for_ready=wait)
        if isinstance(req, pb.OpenSessionRequest):
            return self.client.open_session(req, timeout=timeout, wait_for_ready=wait)
        if isinstance(req, pb.ReportRequest):
            return self.client.report(req, timeout=timeout, wait_for_ready=wait)
        return self.client.end_epoch(req, timeout=timeout, wait_for_ready=wait)

    def _send_waiting(self, req: Union[pb.ReportRequest, pb.EndEpochRequest]) -> object:
        what = f"Report of step {req.step}" if isinstance(req, pb.ReportRequest) else f"EndEpoch of epoch {req.epoch}"
        return self.waiting(lambda timeout: self._send(req, timeout, wait=True), self.call_timeout, what=what, watch_first=False)

    def waiting(self, call: Callable[[float], T], per_call_timeout: float, *, what: str = "a call",
                budget_s: Optional[float] = None, then: Optional[str] = None, watch_first: bool = True) -> T:
        """Retries ``call(timeout)`` through unavailability for up to ``budget_s`` seconds (default
        ``wait_timeout``); after the budget the caller gets ``RegulatorUnreachable`` (the full
        wait) or ``Unavailable`` (a shorter budget). While it waits a warning names the target and
        ``what``: from the start after ``min(5 s, warn_every_s)`` (``watch_first``: a first call
        that may block, like the OpenSession), else from the first failure on (a step's call,
        which costs no timer thread while the regulator answers)."""
        budget = self.wait_timeout if budget_s is None else budget_s
        then = then or f"failing the job (on_unavailable={self.mode!r}, wait_timeout={self.wait_timeout:g}s)"
        patience = Patience(self.target, what, budget, then, self.warn_every_s)
        if watch_first:
            patience.start(min(5.0, self.warn_every_s))
        try:
            while True:
                waited = time.monotonic() - patience.began
                remaining = budget - waited
                if remaining <= 0:
                    last = f" (last error: {patience.last_error})" if patience.last_error else ""
                    if budget_s is not None:
                        raise Unavailable(f"the regulator at {self.target} did not answer {what} within {budget:g}s{last}")
                    raise RegulatorUnreachable(
                        f"the regulator at {self.target} did not answer {what} for {waited:.0f}s "
                        f"(on_unavailable={self.mode!r}); failing instead of training without regulation{last}"
                    )
                try:
                    resp = call(min(per_call_timeout, remaining))
                except TRANSIENT as exc:
                    patience.last_error = exc.message
                    patience.failures += 1
                    patience.start(0.0)  # (started already when watch_first)
                    time.sleep(min(0.2, max(remaining, 0)))
                    continue
                break
        finally:
            patience.stop()
        if patience.failures or patience.warnings:
            took = time.monotonic() - patience.began
            self.stats.waits += 1
            self.stats.waited_s += took
            log.warning("regulator at %s answered %s after %.1fs", self.target, what, took)
        return resp

    def defer_open(self, req: pb.OpenSessionRequest, on_open: Callable[[Any], None]) -> None:
        """A fallback mode's job starts before its session opens: ``req`` goes first in the
        queue, and once the regulator answers it ``on_open(response)`` runs and the queued (and
        later) requests carry the attempt it was assigned."""
        if self.mode == "wait":
            raise RuntimeError("wait mode never starts without a session")
        self._pending.appendleft(req)
        self._on_open = on_open

    def _quiet(self) -> bool:
        """True while a fallback mode pauses after a refused call (only with messages waiting)."""
        return bool(self._pending) and self.clock() < self._quiet_until

    def _refused(self) -> None:
        """A call that got no answer starts or lengthens the pause before the next try."""
        self._quiet_s = min(max(self._quiet_s * 2, QUIET_S[0]), QUIET_S[1])
        self._quiet_until = self.clock() + self._quiet_s

    def flush(self) -> bool:
        """Delivers deferred messages in order; False if the regulator is still unreachable."""
        while self._pending:
            head = self._pending[0]
            try:
                resp = self._send(head, self.call_timeout, wait=False)
            except TRANSIENT:
                self._refused()
                return False
            self._quiet_s = 0.0
            self._pending.popleft()
            if isinstance(head, pb.OpenSessionRequest):
                self._attempt = resp.session.attempt  # type: ignore[attr-defined]
                if self._on_open is not None:
                    self._on_open(resp)
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
        if self._quiet() or not self.flush():
            return None
        try:
            resp = self._send(req, self.call_timeout, wait=False)
        except TRANSIENT:
            self._refused()
            return None
        self._quiet_s = 0.0
        return resp  # type: ignore[return-value]

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
                "regulator at %s unavailable: step %d ran with %s coefficients (%d fallback steps so far)",
                self.target, req.step, "zero" if self.mode == "neutral" else "the last known", n,
            )
        return late

    def end_epoch(self, req: pb.EndEpochRequest) -> Optional[pb.EndEpochResponse]:
        if self.mode == "wait":
            return self._send_waiting(req)  # type: ignore[return-value]
        if not self._quiet() and self.flush():
            try:
                resp = self._send(req, self.call_timeout, wait=False)
            except TRANSIENT:
                self._refused()
            else:
                self._quiet_s = 0.0
                return resp  # type: ignore[return-value]
        self._defer(req)
        self.stats.deferred_epoch_ends += 1
        return None
