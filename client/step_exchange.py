"""``StepExchange``: one training step's round with the regulator, owned by one object.

The order of a step, and which thread does what (``InfoRegHook`` calls 1 and 3):

1. ``send`` - training thread, after the forward pass. Under DDP the scores start summing onto
   the job's leader (async). The previous step's Fisher values (still on the device), and its
   queued fallback report if it ran unanswered, go into the step's ``InFlight``: from here on
   they belong to the report, and nothing the report reads changes until step 3. The leader
   starts the report (``start``): ``"forward"`` hands ``_report`` to the report thread now;
   ``"backward"`` arms a ``ReportTrigger`` whose gradient hook hands it over when the backward
   pass begins (on the autograd engine's thread, under the trigger's lock, which sets the
   future); ``"inline"`` keeps it for step 3.
2. ``_report`` - report thread (or inline in step 3); leader only. Waits for the DDP reduce;
   one host sync brings the job's scores and the previous step's Fisher values; the Report
   round trip, through ``Delivery`` (which waits, or in a fallback mode answers None).
3. ``take`` + ``finish`` - training thread, after ``backward``. ``take`` disarms the trigger:
   under its lock, either the future is set (the hook fired) or it never will be, and the
   report runs inline. ``_answer`` joins the report: the future's result is the only thing
   the report thread hands back. The response (or the
   fallback: zero or the last factors, the step queued as a late report) becomes the step's
   factors, which under DDP the leader broadcasts, with whether the regulator answered at all.
   The factors go on the gradients (``EncoderProbe.apply``); ``_keep`` measures the Fisher
   value of the final gradient and keeps it on the device for step 1 of the next step.

Between steps, ``settle`` (an epoch end, ``close``) takes the kept values to the host instead,
for the EndEpoch or the late report.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import Tensor

from inforeg.regulator.v1 import regulator_pb2 as pb

from .delivery import Delivery
from .hook_state import HookState
from .job_group import JobGroup
from .released import device_proximal
from .report_trigger import ReportTrigger
from .scores import with_count
from .stats import EncoderProbe, noise_seed
from .step_parts import Answer, InFlight, PendingFisher, ReportOutcome, StepResult

STARTS = ("inline", "forward", "backward")
log = logging.getLogger(f"{__package__}.hook")  # the hook's messages, under the logger name users filter by


class StepExchange:
    """The step's exchange (see the module docstring for its order). ``start``: when the
    leader's report starts - ``"inline"`` (in ``finish``), ``"forward"`` (in ``send``, on the
    report thread) or ``"backward"`` (on the report thread when the backward pass begins)."""

    def __init__(
        self, state: HookState, modalities: tuple[str, ...], probe: EncoderProbe, group: JobGroup,
        delivery: Delivery, *, start: str, keep_history: bool,
    ) -> None:
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        self.state, self.modalities, self.probe, self.group = state, modalities, probe, group
        self.delivery = delivery
        self.start = start
        self.keep_history = keep_history
        self.released_gains: Optional[tuple[float, ...]] = None  # official with arithmetic=released
        self.last = Answer.neutral(len(modalities))  # the factors last applied (``last`` mode, metrics)
        self.flight: Optional[InFlight] = None  # the step between its scores and its answer
        self._pending: Optional[PendingFisher] = None  # the last step's Fisher values, not yet sent
        self._late: Optional[pb.ReportRequest] = None  # the last step's queued fallback report
        self._executor: Optional[ThreadPoolExecutor] = None
        self._trigger: ReportTrigger[InFlight] = ReportTrigger(self._submit)
        self._first_grads = probe.first_grads()  # the tensors whose gradients start the report
        self._neutral = [0.0] * len(modalities)  # a skipped step's coefficients

    # -- 1. training thread, after the forward pass ---------------------------------------------

    def send(self, sums: Tensor, count: float, early: bool) -> None:
        """Starts the step: ``early`` (from ``after_forward``) lets the report overlap the
        backward pass; fp16 with a GradScaler reports late, as a skipped step is not reported."""
        st = self.state
        if self.group.active:
            flight = InFlight(st.epoch, st.step, with_count(sums, count))
            flight.work = self.group.reduce_to_leader(flight.local)
        else:
            flight = InFlight(st.epoch, st.step, sums, count)
        flight.previous, flight.late = self._pending, self._late  # now the report's
        self._pending = self._late = None
        if early and self.start != "inline" and self.group.reports:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inforeg-report")
            if self.start == "forward":
                self._submit(flight)
            else:
                flight.armed = True
                self._trigger.arm(flight, self._first_grads)
        self.flight = flight

    def _submit(self, flight: InFlight) -> None:
        """The report to the report thread: from ``send``, or from the trigger (on the autograd
        engine's thread, while the training thread waits in ``backward``)."""
        flight.future = self._executor.submit(self._report, flight)  # type: ignore[union-attr]

    # -- 2. report thread (or inline), leader only ------------------------------------------------

    def _report(self, flight: InFlight) -> ReportOutcome:
        t0 = time.perf_counter()
        if flight.work is not None:
            flight.work.wait()
        m = len(self.modalities)
        prev = flight.previous
        if prev is not None and prev.tensor is not None:
            values = torch.cat([flight.local, prev.tensor]).tolist()  # the step's host sync
            prev.set(values[m if flight.count is not None else m + 1 :])
        else:
            values = flight.local.tolist()
        host = values if flight.count is None else [*values[:m], flight.count]
        ident = self.state.identity
        req = pb.ReportRequest(
            job_id=ident.job_id,
            attempt=ident.attempt,
            rank=ident.rank,
            epoch=flight.epoch,
            step=flight.step,
            count=int(round(host[m])),
            stats=[pb.ModalityStats(modality=name, score_sum=host[i], fisher_deferred=True) for i, name in enumerate(self.modalities)],
            measured=self._fisher_message(prev, flight.late),
        )
        flight.host = host
        resp = self.delivery.report(req)
        self.state.timings.report_s += time.perf_counter() - t0
        return req, resp

    # -- 3. training thread, after backward --------------------------------------------------------

    def take(self) -> InFlight:
        """The step, after its backward pass: a trigger not fired by now leaves it to ``finish``."""
        flight, self.flight = self.flight, None
        assert flight is not None
        if flight.armed:
            self._trigger.disarm()  # the future was set under the trigger's lock, if it fired
            flight.armed = False
        return flight

    def finish(self, flight: InFlight) -> StepResult:
        """The answer, applied; the step's Fisher value kept; the step counted."""
        t0 = time.perf_counter()
        answer = self._answer(flight)
        t1 = time.perf_counter()
        job = self.state.identity.job_id
        self.probe.apply(answer.proximal, answer.grad_scale, answer.noise_scale, lambda i: noise_seed(job, flight.step, i))
        t2 = time.perf_counter()
        result = self._keep(answer, flight)
        tm = self.state.timings
        tm.steps += 1
        tm.wait_s += t1 - t0
        tm.apply_s += t2 - t1
        tm.fisher_s += time.perf_counter() - t2
        return result

    def skip(self, flight: InFlight) -> StepResult:
        """fp16: the GradScaler will skip this step; nothing applied, reported or counted."""
        if flight.work is not None:
            flight.work.wait()
        self._unsend(flight)
        self.state.timings.skipped += 1
        zeros = dict(zip(self.modalities, self._neutral))
        return StepResult(step=flight.step, epoch=flight.epoch, proximal=zeros, window={},
                          duplicate=False, skipped=True, _modalities=self.modalities)

    def unregulated(self) -> StepResult:
        """``REGULATOR_DISABLED``: the step counted, nothing applied, nothing sent."""
        st = self.state
        result = StepResult(step=st.step, epoch=st.epoch, proximal=dict(zip(self.modalities, self._neutral)), window={},
                            duplicate=False, _modalities=self.modalities)
        if self.keep_history:
            st.history.append(result)
        st.step += 1
        return result

    def _answer(self, flight: InFlight) -> Answer:
        """The factors every rank applies: the leader's Report (or its fallback), broadcast to
        the other ranks under DDP together with whether the regulator answered at all."""
        m = len(self.modalities)
        answer: Optional[Answer] = None
        failure: Optional[BaseException] = None
        reports = self.group.reports
        if reports:
            try:
                req, resp = flight.future.result() if flight.future is not None else self._report(flight)
                answer = self._answer_of(req, resp)
            except BaseException as exc:  # the other ranks must hear of it before this one raises
                failure = exc
        elif flight.work is not None:
            flight.work.wait()
        if self.group.active:
            values = self.group.broadcast(answer.packed() if answer is not None else [-1.0] + [0.0] * 4 * m)
            if not reports:
                if values[0] < 0:
                    raise RuntimeError("the job's leader got no answer from the regulator for this step (see its log)")
                answer = Answer.unpacked(values, m)
        if failure is not None:
            raise failure
        assert answer is not None
        self.last = answer
        return answer

    def _answer_of(self, req: pb.ReportRequest, resp: Optional[pb.ReportResponse]) -> Answer:
        if resp is not None:
            answer = Answer.of(resp)
            if self.released_gains is not None:  # tanh and exp as the device rounds them (client/released.py)
                sums = [s.score_sum for s in req.stats]
                proximal = device_proximal(answer.proximal, sums, self.released_gains, self.probe.device)
                answer = Answer(proximal, answer.grad_scale, answer.noise_scale, answer.window, duplicate=answer.duplicate)
            return answer
        last = self.last  # fallback: nothing or the last factors, reported late as applied
        answer = Answer.neutral(len(self.modalities)) if self.delivery.mode == "neutral" else Answer(
            last.proximal, last.grad_scale, last.noise_scale, (), answered=False
        )
        self._late = self.delivery.defer_fallback(req, answer.proximal, answer.grad_scale, answer.noise_scale)
        return answer

    def _keep(self, answer: Answer, flight: InFlight) -> StepResult:
        """The Fisher value of the gradient as it is now (after every factor), kept on the
        device until the next request carries it; the step's result and count."""
        st = self.state
        measured: Optional[PendingFisher] = None
        if self.group.reports:
            measured = PendingFisher(flight.step, flight.epoch, self.probe.fisher())
            if flight.host is not None:  # the step's job-wide scores, for the trace line
                m = len(self.modalities)
                measured.scores, measured.count = flight.host[:m], int(round(flight.host[m]))
        self._pending = measured
        mods = self.modalities
        scaled = answer.scaled
        result = StepResult(
            step=flight.step,
            epoch=flight.epoch,
            proximal=dict(zip(mods, answer.proximal)),
            window={m: bool(w) for m, w in zip(mods, answer.window)} if answer.window else {},
            duplicate=answer.duplicate,
            fallback=not answer.answered,
            grad_scale=dict(zip(mods, answer.grad_scale)) if scaled else {},
            noise_scale=dict(zip(mods, answer.noise_scale)) if scaled else {},
            _measured=measured,
            _modalities=mods,
        )
        if self.keep_history:
            st.history.append(result)
        st.step += 1
        return result

    # -- between steps -----------------------------------------------------------------------------

    def settle(self) -> list[pb.MeasuredFisher]:
        """The last step's Fisher values for the next request (an EndEpoch): [] when there are
        none, or when its queued fallback report took them."""
        measured, late = self._pending, self._late
        self._pending = self._late = None
        return self._fisher_message(measured, late)

    def _fisher_message(self, measured: Optional[PendingFisher], late: Optional[pb.ReportRequest]) -> list[pb.MeasuredFisher]:
        """The values to the host (the sync, unless the scores' sync brought them already) and
        into their trace line; returned for the request at hand, or added to the step's queued
        fallback report."""
        if measured is None:
            return []
        values = measured.values()
        trace = self.state.trace
        if trace is not None:
            mods = self.modalities
            trace.step(measured.epoch, measured.step, measured.count, dict(zip(mods, measured.scores)), dict(zip(mods, values)))
        msg = pb.MeasuredFisher(
            step=measured.step, modalities=[pb.ModalityFisher(modality=m, fisher=v) for m, v in zip(self.modalities, values)]
        )
        if late is not None:  # the step ran without an answer: its late report carries its values
            late.measured.append(msg)
            return []
        return [msg]

    def _unsend(self, flight: InFlight) -> None:
        """A step that was never reported hands its Fisher values back."""
        self._pending, self._late = flight.previous, flight.late

    def close(self) -> None:
        """Ends a step abandoned mid-way, attaches the last values to a queued fallback report,
        stops the report thread."""
        flight, self.flight = self.flight, None
        if flight is not None:
            if flight.armed:
                self._trigger.disarm()
            if flight.future is not None:
                try:
                    flight.future.result()
                except Exception:
                    log.warning("the report of an unfinished step failed", exc_info=True)
            else:
                self._unsend(flight)
        if self._late is not None:  # the last step ran unanswered: its late report needs its values
            self.settle()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
