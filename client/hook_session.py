"""The hook's session calls: OpenSession (now, or late after a fallback start), EndEpoch once per
epoch, and closing - the calls around the steps, as ``step_exchange`` is the steps'."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Optional

from inforeg.regulator.v1 import regulator_pb2 as pb

from . import snapshot as regulation_snapshot
from .delivery import Delivery, target_of
from .environment import DISABLED
from .errors import DeadlineExceeded, Unavailable
from .hook_state import HookState
from .identity import agree_on_attempt
from .job_group import JobGroup
from .notice import notice
from .profiles import profile_name, profile_params as params_of
from .released import released_gains
from .stats import EncoderProbe, arithmetic_of
from .step_exchange import StepExchange
from .trace import TraceWriter

log = logging.getLogger(f"{__package__}.hook")  # the hook's messages, under the logger name users filter by


class _OpenDeferred(Exception):
    """A fallback mode's OpenSession got no answer in time: the job starts without a session."""

    def __init__(self, request: pb.OpenSessionRequest) -> None:
        super().__init__("OpenSession deferred")
        self.request = request


class HookSession:
    """Opens, advances (EndEpoch) and closes the job's session at the regulator."""

    def __init__(
        self, client: Any, state: HookState, profile: pb.Profile, probe: EncoderProbe, group: JobGroup,
        delivery: Delivery, exchange: StepExchange, *, record: Any, close_session: bool, disabled: bool,
    ) -> None:
        self.client, self.state, self.profile, self.probe, self.group = client, state, profile, probe, group
        self.delivery, self.exchange = delivery, exchange
        self.modalities = exchange.modalities
        self.record_path = record
        self.close_session = close_session
        self.disabled = disabled
        self.deferred = False  # started without a session (fallback mode); the OpenSession is queued
        self._said_disabled = False

    # -- opening ------------------------------------------------------------------------------

    def open(self) -> Optional[pb.SessionInfo]:
        """``InfoRegHook.open``."""
        st = self.state
        if self.disabled:
            if not self._said_disabled:
                self._said_disabled = True
                log.warning("%s is set: InfoReg regulation is off for job %s (no regulator contacted, "
                            "gradients untouched)", DISABLED, st.identity.job_id)
            return None
        if self.deferred:
            return None
        try:
            if st.identity.next_attempt:
                token = uuid.uuid4().hex  # one per process start: a retried request gets the same attempt
                assigned = agree_on_attempt(
                    lambda: self._open_session(next_attempt=True, open_token=token).attempt,
                    distributed=self.group.active, process_group=self.group.process_group, device=self.probe.device,
                )
                st.identity = st.identity.assigned(assigned)
            session = self._open_session(attempt=st.identity.attempt)
        except _OpenDeferred as deferred:
            self._defer_open(deferred.request)
            return None
        self._opened(session)
        return session

    def _opened(self, session: pb.SessionInfo) -> None:
        """The session is open (now, or late after a fallback start): the trace, and one line
        saying which profile and parameters are in force."""
        st = self.state
        st.session = session
        self.probe.arithmetic = arithmetic_of(session.profile)  # the profile as the regulator resolved it
        self.exchange.released_gains = released_gains(session.profile, self.modalities)
        if st.snapshot is None:
            st.snapshot = regulation_snapshot.start(self.modalities, session.profile)
        self._start_trace(session.profile)
        if st.identity.rank == 0:
            params = ", ".join(f"{k}={v!r}" for k, v in params_of(session.profile).items())
            notice(log, "InfoReg session of job %s (attempt %d, regulator %s): profile %s (%s), modalities %s, on_unavailable=%s",
                   st.identity.job_id, session.attempt, target_of(self.client), profile_name(session.profile),
                   params or "its defaults", ", ".join(self.modalities), self.delivery.mode)

    def _start_trace(self, profile: pb.Profile) -> None:
        """The statistics trace (``record=``, rank 0), headed by the profile's reference
        modality where it has one (replay needs it)."""
        st = self.state
        if self.record_path is not None and st.trace is None and st.identity.rank == 0:
            ref = params_of(profile).get("reference_modality")
            st.trace = TraceWriter(self.record_path, self.modalities, ref or None)

    def _defer_open(self, req: pb.OpenSessionRequest) -> None:
        """A fallback mode's start without the regulator: zero coefficients until it answers;
        the OpenSession goes first in the delivery queue, the steps follow as fallback steps."""
        self.deferred = True
        self.delivery.defer_open(req, self._opened_late)
        log.warning(
            "regulator at %s did not answer OpenSession within %gs: job %s starts without regulation "
            "(on_unavailable=%r, zero coefficients); its session opens when the regulator answers, "
            "and the steps until then are reported as fallback steps",
            target_of(self.client), self.client.timeout or self.delivery.call_timeout, self.state.identity.job_id,
            self.delivery.mode,
        )
        self._start_trace(self.profile)

    def _opened_late(self, resp: pb.OpenSessionResponse) -> None:
        st = self.state
        if st.identity.next_attempt:
            st.identity = st.identity.assigned(resp.session.attempt)
        self.deferred = False
        log.warning("regulator at %s answered: the session of job %s is open; regulation starts with the next step",
                    target_of(self.client), st.identity.job_id)
        self._opened(resp.session)

    def _open_session(self, **fields: Any) -> pb.SessionInfo:
        st = self.state
        ident = st.identity
        req = pb.OpenSessionRequest(
            job_id=ident.job_id,
            world_size=ident.world_size,
            modalities=list(self.modalities),
            profile=self.profile,
            resume_epoch=st.start_epoch,
            **fields,
        )
        resumed = regulation_snapshot.for_resume(st.snapshot, st.start_epoch)
        if resumed is not None:  # restores the job on a regulator that lost it (preemption)
            req.snapshot.CopyFrom(resumed)
        delivery = self.delivery
        per_call = self.client.timeout or delivery.call_timeout
        send = lambda timeout: self.client.send(req, timeout=timeout, wait_for_ready=True)  # noqa: E731
        if delivery.mode == "wait" or (ident.next_attempt and self.group.active):
            # (a leader that assigns the attempt for its ranks cannot leave them without one)
            return delivery.waiting(send, per_call, what="OpenSession").session
        try:
            return delivery.waiting(  # one call's deadline: a slow regulator still opens the session
                send, per_call, what="OpenSession", budget_s=per_call,
                then=f"starting the job without regulation (on_unavailable={delivery.mode!r})",
            ).session
        except (Unavailable, DeadlineExceeded):
            raise _OpenDeferred(req) from None

    # -- epochs -------------------------------------------------------------------------------

    def end_epoch(self) -> Optional[pb.EndEpochResponse]:
        """``InfoRegHook.on_epoch_end``: the leader sends EndEpoch with the last step's Fisher
        values, and under DDP the other ranks receive its answer (one broadcast per epoch)."""
        st = self.state
        t0 = time.perf_counter()
        resp: Optional[pb.EndEpochResponse] = None
        failure: Optional[BaseException] = None
        if self.group.reports:
            try:
                measured = self.exchange.settle()
                req = pb.EndEpochRequest(
                    job_id=st.identity.job_id, attempt=st.identity.attempt, rank=st.identity.rank, epoch=st.epoch,
                )
                if measured:
                    req.measured.CopyFrom(measured[0])
                resp = self.delivery.end_epoch(req)
            except BaseException as exc:  # the other ranks must hear of it before this one raises
                failure = exc
        if self.group.active:
            status, payload = self.group.broadcast_object(
                ("failed", None) if failure is not None else ("ok", resp.SerializeToString() if resp else None)
            )
            if status == "failed" and failure is None:
                raise RuntimeError("the job's leader could not close the epoch at the regulator (see its log)")
            resp = pb.EndEpochResponse.FromString(payload) if payload is not None else None
        if failure is not None:
            raise failure
        st.timings.epoch_s += time.perf_counter() - t0
        if st.trace is not None:
            st.trace.epoch_end(st.epoch)
        st.epoch += 1
        st.in_epoch = False
        if resp is not None:
            st.last_epoch_end = resp
            if st.snapshot is not None:
                regulation_snapshot.add_closed(st.snapshot, resp.closed)
        return resp

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """``InfoRegHook.close``: the steps' exchange ends, then deferred messages go out and the
        session closes."""
        st = self.state
        self.exchange.close()
        if st.trace is not None:
            st.trace.close()
            st.trace = None
        if st.session is None and not self.deferred:
            return
        delivered = self.delivery.flush()  # (a deferred OpenSession first, if the job started without one)
        if not delivered:
            log.error(
                "the regulator is unreachable: %d deferred message(s) of job %s were not delivered; "
                "its history lacks those steps",
                self.delivery.pending, st.identity.job_id,
            )
        elif self.close_session:
            self.client.close_session(st.identity.job_id, attempt=st.identity.attempt)
        st.session = None
