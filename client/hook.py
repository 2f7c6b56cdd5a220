"""``InfoRegHook``: InfoReg regulation for a plain PyTorch training loop.

    hook = InfoRegHook(client, {"audio": model.audio_net, "visual": model.visual_net},
                       job_id="run-1", profile="official")
    with hook:                                   # OpenSession ... CloseSession
        for epoch in range(epochs):
            hook.on_epoch_start(epoch)           # anchors := encoder weights
            for x, y in loader:
                optimizer.zero_grad()
                fused, uni = model(x)
                hook.after_forward(logits=uni, labels=y)   # the scores go out now ...
                loss_fn(fused, y).backward()               # ... the round trip hides behind backward
                hook.after_backward()            # grad += beta_m * (w - w_anchor); Fisher value
                optimizer.step()
            hook.on_epoch_end()                  # EndEpoch: next epoch's window

``hook.after_backward(logits=uni, labels=y)`` alone (after ``backward``) does both parts in one
call, without the overlap.

Every step has three parts:

- **measure** (on the device, no host sync): the step's scores (``after_forward``), and, once the
  answer is applied, the Fisher value of the gradient the optimizer will apply (``after_backward``);
- **exchange**: one Report per step and job. The scores leave right after the forward pass, in a
  background thread, together with the previous step's Fisher value (the step's single host
  sync); the regulator's answer depends only on the epoch's window and the scores. Under DDP the
  scores are summed onto the job's leader (rank 0 of the process group), which alone reports,
  and the answer reaches every rank in one broadcast;
- **apply**: the answer's factors on the encoders' gradients (``EncoderProbe.apply``): GE noise
  and gradient scale (OGM-GE), then the proximal term (InfoReg).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from inforeg.regulator.v1 import regulator_pb2 as pb

from . import snapshot as regulation_snapshot
from .client import RegulatorClient
from .delivery import Delivery, DeliveryStats, target_of
from .environment import DISABLED, ClientEnvironment
from .errors import DeadlineExceeded, Unavailable
from .notice import notice
from .identity import AttemptLike, JobIdentity, agree_on_attempt
from .profiles import ProfileLike, default_profile, make_profile, profile_name, profile_params as params_of
from .released import device_proximal, released_gains
from .stats import DEFAULT_PROXIMAL, DEFAULT_SCALE, FISHER_MODULES, RELEASED, EncoderProbe, Selector, arithmetic_of, noise_seed, score_sums
from .trace import TraceWriter
from .training_metrics import UNSCALED_PROFILES, flat_metrics

log = logging.getLogger(__name__)

Logits = Union[Mapping[str, Tensor], Sequence[Tensor], None]
Scores = Union[Mapping[str, Union[float, Tensor]], None]


class _Measured:
    """One step's Fisher values: a device tensor until first read, then host floats. Reading
    them is the host sync; the hook does it once, together with the next step's scores."""

    __slots__ = ("step", "epoch", "count", "scores", "_tensor", "_values")

    def __init__(self, step: int, epoch: int, tensor: Tensor) -> None:
        self.step, self.epoch = step, epoch
        self.count = 0  # the step's global batch and score sums, for the statistics trace
        self.scores: list[float] = []
        self._tensor: Optional[Tensor] = tensor
        self._values: Optional[list[float]] = None

    @property
    def tensor(self) -> Optional[Tensor]:
        return self._tensor

    def set(self, values: list[float]) -> None:
        self._values, self._tensor = values, None

    def values(self) -> list[float]:
        if self._values is None:
            assert self._tensor is not None
            self.set(self._tensor.tolist())
        return self._values  # type: ignore[return-value]


@dataclass
class StepResult:
    step: int
    epoch: int
    proximal: dict[str, float]  # coefficients applied
    window: dict[str, bool]  # empty on a fallback step
    duplicate: bool
    fallback: bool = False  # the regulator did not answer in time; see ``on_unavailable``
    grad_scale: dict[str, float] = field(default_factory=dict)  # empty: no modality scaled
    noise_scale: dict[str, float] = field(default_factory=dict)  # empty: no gradient noise
    skipped: bool = False  # fp16: the GradScaler found inf/NaN; nothing applied or reported
    _measured: Optional[_Measured] = field(default=None, repr=False, compare=False)
    _modalities: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def fisher(self) -> dict[str, float]:
        """The step's Fisher contribution (after every factor), as the regulator records it.
        Empty on a rank that does not report (DDP) and on a skipped step. Computed on the device;
        reading it early costs a host sync that the hook would otherwise make with the next step."""
        if self._measured is None:
            return {}
        return dict(zip(self._modalities, self._measured.values()))


@dataclass
class HookTimings:
    """Where the hook's time goes (seconds, summed over steps; ``report_s`` runs in the
    background, overlapping the backward pass when ``after_forward`` is used)."""

    steps: int = 0
    skipped: int = 0  # fp16 steps the GradScaler skipped (not reported)
    scores_s: float = 0.0  # after_forward: scores on the device, DDP reduce started, report handed off
    wait_s: float = 0.0  # after_backward: waiting for the answer (and its DDP broadcast)
    apply_s: float = 0.0  # the factors on the gradients
    fisher_s: float = 0.0  # the Fisher pass over the weight gradients
    report_s: float = 0.0  # host sync, request, Report round trip
    epoch_s: float = 0.0  # EndEpoch round trips

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class _State:
    epoch: int = 0
    step: int = 0
    in_epoch: bool = False
    session: Optional[pb.SessionInfo] = None
    history: list[StepResult] = field(default_factory=list)
    # the closed epochs as the regulator answered them, for checkpoints (``snapshot.py``)
    snapshot: Optional[pb.SessionSnapshot] = None


@dataclass(frozen=True)
class _Answer:
    """The factors every rank applies for one step."""

    proximal: tuple[float, ...]
    grad_scale: tuple[float, ...]
    noise_scale: tuple[float, ...]
    window: tuple[Optional[bool], ...] = ()  # () or None entries: unknown (fallback)
    answered: bool = True
    duplicate: bool = False

    @classmethod
    def neutral(cls, m: int) -> "_Answer":
        return cls((0.0,) * m, (1.0,) * m, (0.0,) * m, (), answered=False)

    @classmethod
    def of(cls, resp: pb.ReportResponse) -> "_Answer":
        f = [s.factors for s in resp.step.modalities]
        return cls(
            tuple(x.proximal for x in f),
            tuple(x.grad_scale if x.HasField("grad_scale") else 1.0 for x in f),
            tuple(x.noise_scale for x in f),
            tuple(w.open for w in resp.window),
            duplicate=resp.duplicate,
        )

    def packed(self) -> list[float]:
        """``[status, proximal.., grad_scale.., noise_scale.., window..]`` for the broadcast."""
        m = len(self.proximal)
        window = [(-1.0 if w is None else float(w)) for w in self.window] if self.window else [-1.0] * m
        return [1.0 if self.answered else 0.0, *self.proximal, *self.grad_scale, *self.noise_scale, *window]

    @classmethod
    def unpacked(cls, box: list[float], m: int) -> "_Answer":
        window = tuple(None if w < 0 else bool(w) for w in box[1 + 3 * m : 1 + 4 * m])
        return cls(
            tuple(box[1 : 1 + m]), tuple(box[1 + m : 1 + 2 * m]), tuple(box[1 + 2 * m : 1 + 3 * m]),
            () if any(w is None for w in window) else window, answered=box[0] == 1.0,
        )


class _OpenDeferred(Exception):
    """A fallback mode's OpenSession got no answer in time: the job starts without a session."""

    def __init__(self, request: pb.OpenSessionRequest) -> None:
        super().__init__("OpenSession deferred")
        self.request = request


@dataclass
class _InFlight:
    """A step between its scores and its answer."""

    local: Tensor  # [s_1..s_M, count] of this process (the leader's: summed over the job after ``work``)
    work: Any = None  # DDP: the async reduce of the scores onto the leader
    future: Optional["Future[tuple[pb.ReportRequest, Optional[pb.ReportResponse]]]"] = None
    host: Optional[list[float]] = None  # the leader's job-wide scores and count, once on the host


class InfoRegHook:
    """Reports each step's statistics to a regulator and applies its factors.

    Args:
        client: a ``RegulatorClient`` (remote or in-process).
        encoders: modality name -> encoder module, in the order the session declares them.
        job_id, attempt, rank, world_size: identity; defaults come from torch.distributed and
            the environment (see ``JobIdentity.resolve``). ``attempt="next"`` (the default
            outside torchrun, or ``REGULATOR_ATTEMPT=next``): the regulator assigns the attempt
            after the job's latest, so a retried process continues the job.
        profile: ``"official"``, ``"paper"``, ``"ogm-ge"``, ``"none"`` or a ``pb.Profile``;
            ``profile_params`` are its parameters (e.g. ``reference_modality="audio"``). Default
            (``None``): ``"official"`` (the released code's rules) for two modalities, ``"paper"``
            for any other number (``profiles.default_profile``). The session's opening logs the
            profile and parameters in force.
        record: path of a statistics trace to write (replayable by ``regulator replay``).
        process_group: the group of the job's ranks (default: the world, when initialised).
            Its rank 0 is the job's leader: the only rank that reports; the others receive
            each step's answer in one broadcast.
        keep_history: keep every ``StepResult`` in ``hook.history`` (per-rank logging, tests).
        close_session: send CloseSession on ``close()`` (default: rank 0 only).
        on_unavailable: ``"wait"`` (block up to ``wait_timeout`` s, then raise),
            ``"neutral"`` (zero coefficients) or ``"last"`` (last factors) after one
            ``call_timeout``; fallback steps are reported later and marked in the history.
            Under DDP the leader decides and the broadcast tells the other ranks what to apply.
            Default (``None``): ``REGULATOR_ON_UNAVAILABLE``, else ``"wait"``. In a fallback mode
            a regulator that does not answer the OpenSession within one call's deadline (the
            client's ``timeout``, else ``call_timeout``) does not hold the job: it starts with
            zero coefficients and the session opens (with the steps so far, marked as fallback
            steps) once the regulator answers.
        warn_every_s: while a call waits for the regulator, a warning names the target, the call
            and how long it keeps trying, then again every ``warn_every_s`` s: the OpenSession's
            first after ``min(5, warn_every_s)`` s, a step's (``wait`` mode) at its first failure.
        ``REGULATOR_DISABLED=1`` in the environment: the hook makes no connection and applies
        nothing (the gradients of plain training), and says so once in a log line.
        start_epoch, start_step: where an elastic restart resumes from its checkpoint. With a
            higher ``attempt`` the new session inherits the previous attempt's closed epochs
            before ``start_epoch`` (traces and windows), so regulation continues as if
            uninterrupted.
        proximal_params, scale_params: which parameters of each encoder get the proximal term
            (default ``"all"``: every parameter, as the released InfoReg code) and the gradient
            scale and noise (default ``"conv"``: the 4-D weight tensors, as the released OGM-GE
            code); ``"weights"`` = the Linear/Conv weights; or a function ``(name, param) ->
            bool``; or a mapping modality -> one of these (others keep the default).
        fisher_dtype: ``torch.float32`` (default: each weight tensor's sum of squares in float32,
            accumulated over tensors in float64) or ``torch.float64`` (every tensor in float64).
        overlap: send the report from a background thread, so that its round trip overlaps the
            backward pass (only with ``after_forward``). ``"auto"`` (default): when the client
            talks to a server, or the encoders are on a GPU (the thread also takes the host sync
            off the training loop). An in-process regulator on a CPU job is run inline: its work
            is Python that needs the GIL, which a thread would only contend for.
        grad_scaler, optimizer: fp16 mixed precision with ``torch.amp.GradScaler``: the hook
            unscales the optimizer's gradients (``scaler.unscale_(optimizer)``, unless you did)
            before anything reads them, and a step whose gradients hold inf/NaN - the scaler
            will skip it - is neither regulated, reported nor counted.
    """

    def __init__(
        self,
        client: RegulatorClient,
        encoders: Mapping[str, nn.Module],
        *,
        job_id: Optional[str] = None,
        attempt: AttemptLike = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        profile: ProfileLike = None,
        profile_params: Optional[Mapping[str, Any]] = None,
        record: Union[str, os.PathLike[str], None] = None,
        process_group: Any = None,
        fisher_modules: tuple[type[nn.Module], ...] = FISHER_MODULES,
        keep_history: bool = False,
        close_session: Optional[bool] = None,
        on_unavailable: Optional[str] = None,
        call_timeout: float = 10.0,
        wait_timeout: float = 300.0,
        warn_every_s: float = 15.0,
        start_epoch: int = 0,
        start_step: int = 0,
        proximal_params: Union[Selector, Mapping[str, Selector]] = DEFAULT_PROXIMAL,
        scale_params: Union[Selector, Mapping[str, Selector]] = DEFAULT_SCALE,
        fisher_dtype: torch.dtype = torch.float32,
        overlap: Union[bool, str] = "auto",
        grad_scaler: Any = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> None:
        if len(encoders) < 2:
            raise ValueError(f"InfoReg needs at least 2 modalities, got {list(encoders)}")
        if grad_scaler is not None and optimizer is None:
            raise ValueError("grad_scaler needs the optimizer whose gradients it scales (optimizer=...)")
        env = ClientEnvironment.read()  # REGULATOR_ON_UNAVAILABLE, REGULATOR_DISABLED
        self.disabled = env.disabled
        self.client = client
        self.modalities = tuple(encoders)
        self.identity = JobIdentity.resolve(job_id, attempt, rank, world_size)
        name = default_profile(len(self.modalities)) if profile is None else profile
        self.profile = make_profile(name, **dict(profile_params or {}))
        self.probe = EncoderProbe(
            encoders, fisher_modules, proximal_params=proximal_params, scale_params=scale_params, fisher_dtype=fisher_dtype,
            arithmetic=arithmetic_of(self.profile),
        )
        self._released_gains: Optional[tuple[float, ...]] = None  # official with arithmetic=released
        self.record_path = record
        self.process_group = process_group
        self.keep_history = keep_history
        self.close_session = self.identity.rank == 0 if close_session is None else close_session
        if overlap not in (True, False, "auto"):
            raise ValueError(f"overlap must be True, False or 'auto', got {overlap!r}")
        auto = bool(getattr(client, "remote", True)) or self.probe.device.type == "cuda"
        self.overlap = auto if overlap == "auto" else bool(overlap)
        self.grad_scaler = grad_scaler
        self.optimizer = optimizer
        self.timings = HookTimings()
        self.delivery = Delivery(client, env.mode(on_unavailable), call_timeout, wait_timeout, warn_every_s=warn_every_s)
        if start_epoch < 0 or start_step < 0:
            raise ValueError("start_epoch and start_step must be >= 0")
        self.start_epoch = start_epoch
        self._state = _State(epoch=start_epoch, step=start_step)
        self._trace: Optional[TraceWriter] = None
        self._last = _Answer.neutral(len(self.modalities))
        self._last_epoch_end: Optional[pb.EndEpochResponse] = None  # for metrics()
        self._flight: Optional[_InFlight] = None
        self._pending: Optional[_Measured] = None  # the last step's Fisher values, not yet sent
        self._late: Optional[pb.ReportRequest] = None  # the last step's queued fallback report
        self._executor: Optional[ThreadPoolExecutor] = None
        self._dist: Optional[bool] = None  # torch.distributed in use (decided on first use)
        self._leader = 0
        self._reporter = True
        self._deferred = False  # started without a session (fallback mode); the OpenSession is queued
        self._said_disabled = False

    # -- properties -----------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._state.epoch

    @property
    def step(self) -> int:
        """The next step's number (steps count from 0 within the job)."""
        return self._state.step

    @property
    def session(self) -> Optional[pb.SessionInfo]:
        return self._state.session

    @property
    def history(self) -> list[StepResult]:
        return self._state.history

    @property
    def fallbacks(self) -> DeliveryStats:
        """Counts of steps applied without an answer, deferred epoch ends, waits."""
        return self.delivery.stats

    @property
    def reports(self) -> bool:
        """Whether this process sends the job's Reports (the leader under DDP, else always)."""
        self._distributed()
        return self._reporter

    def metrics(self) -> dict[str, float]:
        """The regulation as flat scalars for a training log (``inforeg/<modality>/proximal``,
        ``.../window_open``, ``.../fisher_trace``, ``inforeg/fallbacks/...``; the keys are listed in
        ``regulator_client.training_metrics``). Host values only: cheap enough for every step.
        Empty under ``REGULATOR_DISABLED``: nothing is regulated."""
        if self.disabled:
            return {}
        st = self._state
        return flat_metrics(
            self.modalities,
            epoch=st.epoch if st.in_epoch else st.epoch - 1,
            last_step=self._last if self.timings.steps else None,
            last_epoch_end=self._last_epoch_end,
            delivery=self.delivery.stats,
            scaled=profile_name(self.profile) not in UNSCALED_PROFILES,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> Optional[pb.SessionInfo]:
        """Opens (or rejoins) the session of this job and attempt. In ``wait`` mode this waits
        for the regulator (up to ``wait_timeout``): a job does not start unregulated. In a
        fallback mode it tries for one call's deadline, then starts the job without a session
        (None; see ``on_unavailable``). With attempt ``"next"`` the regulator assigns it first (the
        leader asks, see ``agree_on_attempt``). ``REGULATOR_DISABLED``: None, nothing sent."""
        if self.disabled:
            if not self._said_disabled:
                self._said_disabled = True
                log.warning("%s is set: InfoReg regulation is off for job %s (no regulator contacted, "
                            "gradients untouched)", DISABLED, self.identity.job_id)
            return None
        if self._deferred:
            return None
        try:
            if self.identity.next_attempt:
                token = uuid.uuid4().hex  # one per process start: a retried request gets the same attempt
                assigned = agree_on_attempt(
                    lambda: self._open_session(next_attempt=True, open_token=token).attempt,
                    distributed=self._distributed(), process_group=self.process_group, device=self.probe.device,
                )
                self.identity = self.identity.assigned(assigned)
            session = self._open_session(attempt=self.identity.attempt)
        except _OpenDeferred as deferred:
            self._defer_open(deferred.request)
            return None
        self._opened(session)
        return session

    def _opened(self, session: pb.SessionInfo) -> None:
        """The session is open (now, or late after a fallback start): the trace, and one line
        saying which profile and parameters are in force."""
        self._state.session = session
        self.probe.arithmetic = arithmetic_of(session.profile)  # the profile as the regulator resolved it
        self._released_gains = released_gains(session.profile, self.modalities)
        if self._state.snapshot is None:
            self._state.snapshot = regulation_snapshot.start(self.modalities, session.profile)
        if self.record_path is not None and self._trace is None and self.identity.rank == 0:
            ref = None
            if profile_name(session.profile) == "official":
                ref = session.profile.official.reference_modality
            self._trace = TraceWriter(self.record_path, self.modalities, ref)
        if self.identity.rank == 0:
            params = ", ".join(f"{k}={v!r}" for k, v in params_of(session.profile).items())
            notice(log, "InfoReg session of job %s (attempt %d, regulator %s): profile %s (%s), modalities %s, on_unavailable=%s",
                   self.identity.job_id, session.attempt, target_of(self.client), profile_name(session.profile),
                   params or "its defaults", ", ".join(self.modalities), self.delivery.mode)

    def _defer_open(self, req: pb.OpenSessionRequest) -> None:
        """A fallback mode's start without the regulator: zero coefficients until it answers;
        the OpenSession goes first in the delivery queue, the steps follow as fallback steps."""
        self._deferred = True
        self.delivery.defer_open(req, self._opened_late)
        log.warning(
            "regulator at %s did not answer OpenSession within %gs: job %s starts without regulation "
            "(on_unavailable=%r, zero coefficients); its session opens when the regulator answers, "
            "and the steps until then are reported as fallback steps",
            target_of(self.client), self.client.timeout or self.delivery.call_timeout, self.identity.job_id, self.delivery.mode,
        )
        if self.record_path is not None and self._trace is None and self.identity.rank == 0:
            ref = self.profile.official.reference_modality if profile_name(self.profile) == "official" else None
            self._trace = TraceWriter(self.record_path, self.modalities, ref or None)

    def _opened_late(self, resp: pb.OpenSessionResponse) -> None:
        if self.identity.next_attempt:
            self.identity = self.identity.assigned(resp.session.attempt)
        self._deferred = False
        log.warning("regulator at %s answered: the session of job %s is open; regulation starts with the next step",
                    target_of(self.client), self.identity.job_id)
        self._opened(resp.session)

    def _open_session(self, **fields: Any) -> pb.SessionInfo:
        ident = self.identity
        req = pb.OpenSessionRequest(
            job_id=ident.job_id,
            world_size=ident.world_size,
            modalities=list(self.modalities),
            profile=self.profile,
            resume_epoch=self.start_epoch,
            **fields,
        )
        resumed = regulation_snapshot.for_resume(self._state.snapshot, self.start_epoch)
        if resumed is not None:  # restores the job on a regulator that lost it (preemption)
            req.snapshot.CopyFrom(resumed)
        delivery = self.delivery
        per_call = self.client.timeout or delivery.call_timeout
        send = lambda timeout: self.client.send(req, timeout=timeout, wait_for_ready=True)  # noqa: E731
        if delivery.mode == "wait" or (self.identity.next_attempt and self._distributed()):
            # (a leader that assigns the attempt for its ranks cannot leave them without one)
            return delivery.waiting(send, per_call, what="OpenSession").session
        try:
            return delivery.waiting(  # one call's deadline: a slow regulator still opens the session
                send, per_call, what="OpenSession", budget_s=per_call,
                then=f"starting the job without regulation (on_unavailable={delivery.mode!r})",
            ).session
        except (Unavailable, DeadlineExceeded):
            raise _OpenDeferred(req) from None

    def on_epoch_start(self, epoch: Optional[int] = None) -> None:
        """Snapshots the encoders' weights as this epoch's proximal anchors."""
        if self._state.session is None:
            self.open()
        if epoch is not None and epoch != self._state.epoch:
            raise ValueError(f"epoch {epoch} starts out of order: the hook is at epoch {self._state.epoch}")
        if not self.disabled:
            self.probe.snapshot()
        self._state.in_epoch = True

    # -- one step: measure, exchange, apply ---------------------------------------------------

    def after_forward(self, logits: Logits = None, labels: Optional[Tensor] = None, *,
                      scores: Scores = None, count: Optional[int] = None) -> None:
        """Call right after the forward pass, before ``backward()``: the step's scores go to the
        regulator in the background while the backward pass runs.

        Pass the unimodal ``logits`` (per modality) with the ``labels``, or ready per-modality
        ``scores`` (sums of true-class probabilities over the local batch) with ``count``."""
        self._require_epoch("after_forward")
        if self.disabled:
            return
        if self._flight is not None:
            raise RuntimeError("after_forward() twice in one step: call after_backward() after the backward pass")
        self._start(logits, labels, scores, count, early=True)

    def after_backward(self, logits: Logits = None, labels: Optional[Tensor] = None, *,
                       scores: Scores = None, count: Optional[int] = None) -> StepResult:
        """Call after ``loss.backward()`` and before ``optimizer.step()`` (and before clipping).

        Applies the regulator's answer to the encoders' gradients and measures the step's Fisher
        value. Give the scores here (``logits``/``labels`` or ``scores``/``count``, as for
        ``after_forward``) if ``after_forward`` was not called for this step."""
        self._require_epoch("after_backward")
        if self.disabled:  # REGULATOR_DISABLED: nothing applied, nothing sent
            zeros = {m: 0.0 for m in self.modalities}
            result = StepResult(step=self._state.step, epoch=self._state.epoch, proximal=zeros, window={},
                                duplicate=False, _modalities=self.modalities)
            if self.keep_history:
                self._state.history.append(result)
            self._state.step += 1
            return result
        if logits is not None or scores is not None:
            if self._flight is not None:
                raise RuntimeError("this step's scores went to after_forward() already; call after_backward() without them")
            self._start(logits, labels, scores, count, early=False)
        elif self._flight is None:
            raise RuntimeError(
                "after_backward() without the step's scores: call after_forward(logits=..., labels=...) "
                "after the forward pass, or pass them here"
            )
        flight, self._flight = self._flight, None
        if self._amp_skipped():
            return self._skip(flight)
        t0 = time.perf_counter()
        answer = self._exchange(flight)
        t1 = time.perf_counter()
        self._apply(answer)
        t2 = time.perf_counter()
        result = self._measure(answer, flight)
        tm = self.timings
        tm.steps += 1
        tm.wait_s += t1 - t0
        tm.apply_s += t2 - t1
        tm.fisher_s += time.perf_counter() - t2
        return result

    def _start(self, logits: Logits, labels: Optional[Tensor], scores: Scores, count: Optional[int], early: bool) -> None:
        t0 = time.perf_counter()
        self._flight = self._send_scores(self.local_scores(logits, labels, scores=scores, count=count), early=early)
        self.timings.scores_s += time.perf_counter() - t0

    # -- measure ------------------------------------------------------------------------------

    def local_scores(self, logits: Logits, labels: Optional[Tensor], *,
                     scores: Scores = None, count: Optional[int] = None) -> Tensor:
        """``[s_1..s_M, count]`` of this process's batch, float64 on the encoders' device
        (validated; integrations that accumulate micro-batches sum these)."""
        device = self.probe.device
        if logits is not None:
            if labels is None:
                raise ValueError("labels are required with logits")
            if isinstance(logits, Mapping):
                if set(logits) != set(self.modalities):
                    raise ValueError(f"logits for {sorted(logits)}, expected {sorted(self.modalities)}")
                seq = [logits[m] for m in self.modalities]
            else:
                seq = list(logits)
                if len(seq) != len(self.modalities):
                    raise ValueError(f"{len(seq)} logits for {len(self.modalities)} modalities")
            sums = score_sums(seq, labels, released=self.probe.arithmetic == RELEASED).to(device)
            n = torch.tensor([float(labels.numel())], dtype=torch.float64, device=device)
            return torch.cat([sums, n])
        if scores is None or count is None:
            raise ValueError("pass logits and labels, or scores and count")
        if set(scores) != set(self.modalities):
            raise ValueError(f"scores for {sorted(scores)}, expected {sorted(self.modalities)}")
        vals = [torch.as_tensor(scores[m], dtype=torch.float64, device=device).reshape(()) for m in self.modalities]
        return torch.stack([*vals, torch.tensor(float(count), dtype=torch.float64, device=device)])

    def _measure(self, answer: _Answer, flight: _InFlight) -> StepResult:
        """The Fisher value of the gradient as it is now (after every factor), kept on the
        device until the next request carries it; the step's bookkeeping."""
        st = self._state
        measured: Optional[_Measured] = None
        if self.reports:
            measured = _Measured(st.step, st.epoch, self.probe.fisher())
            if flight.host is not None:  # the step's job-wide scores, for the trace line
                m = len(self.modalities)
                measured.scores, measured.count = flight.host[:m], int(round(flight.host[m]))
        self._pending = measured
        mods = self.modalities
        scaled = any(k != 1.0 for k in answer.grad_scale) or any(n != 0.0 for n in answer.noise_scale)
        result = StepResult(
            step=st.step,
            epoch=st.epoch,
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

    def _settle(self) -> list[pb.MeasuredFisher]:
        """The last step's Fisher values to the host (the sync, unless the scores' sync brought
        them already) and into its trace line; returns them for the next request, or adds them
        to the step's queued fallback report."""
        measured, self._pending = self._pending, None
        late, self._late = self._late, None
        if measured is None:
            return []
        values = measured.values()
        if self._trace is not None:
            mods = self.modalities
            self._trace.step(measured.epoch, measured.step, measured.count, dict(zip(mods, measured.scores)), dict(zip(mods, values)))
        msg = pb.MeasuredFisher(
            step=measured.step, modalities=[pb.ModalityFisher(modality=m, fisher=v) for m, v in zip(self.modalities, values)]
        )
        if late is not None:  # the step ran without an answer: its late report carries its values
            late.measured.append(msg)
            return []
        return [msg]

    # -- exchange -----------------------------------------------------------------------------

    def _send_scores(self, local: Tensor, early: bool) -> _InFlight:
        """Starts the step's exchange: under DDP the scores are summed onto the leader (async);
        the leader reports from the background thread (``early`` and ``overlap``), or later
        from ``after_backward`` (fp16 with a GradScaler: a skipped step must not be reported)."""
        flight = _InFlight(local)
        if self._distributed():
            import torch.distributed as dist

            flight.work = dist.reduce(local, dst=self._leader, group=self.process_group, async_op=True)
        if early and self.overlap and self.reports and self.grad_scaler is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inforeg-report")
            flight.future = self._executor.submit(self._report, flight)
        return flight

    def _report(self, flight: _InFlight) -> tuple[pb.ReportRequest, Optional[pb.ReportResponse]]:
        """The leader's Report of the step (background thread, or inline): one host sync brings
        the job's scores and the previous step's Fisher values, then the round trip."""
        t0 = time.perf_counter()
        if flight.work is not None:
            flight.work.wait()
        m = len(self.modalities)
        prev = self._pending
        if prev is not None and prev.tensor is not None:
            host = torch.cat([flight.local, prev.tensor]).tolist()  # the step's host sync
            prev.set(host[m + 1 :])
        else:
            host = flight.local.tolist()
        st, ident = self._state, self.identity
        count = int(round(host[m]))
        req = pb.ReportRequest(
            job_id=ident.job_id,
            attempt=ident.attempt,
            rank=ident.rank,
            epoch=st.epoch,
            step=st.step,
            count=count,
            stats=[pb.ModalityStats(modality=name, score_sum=host[i], fisher_deferred=True) for i, name in enumerate(self.modalities)],
            measured=self._settle(),
        )
        flight.host = host
        resp = self.delivery.report(req)
        self.timings.report_s += time.perf_counter() - t0
        return req, resp

    def _exchange(self, flight: _InFlight) -> _Answer:
        """The answer every rank applies: the leader's Report (or its fallback), broadcast to
        the other ranks under DDP together with whether the regulator answered at all."""
        m = len(self.modalities)
        answer: Optional[_Answer] = None
        failure: Optional[BaseException] = None
        if self.reports:
            try:
                req, resp = flight.future.result() if flight.future is not None else self._report(flight)
                answer = self._answer_of(req, resp)
            except BaseException as exc:  # the other ranks must hear of it before this one raises
                failure = exc
        elif flight.work is not None:
            flight.work.wait()
        if self._distributed():
            import torch.distributed as dist

            box = torch.tensor(
                answer.packed() if answer is not None else [-1.0] + [0.0] * 4 * m,
                dtype=torch.float64, device=self._collective_device(),
            )
            dist.broadcast(box, src=self._leader, group=self.process_group)
            if not self.reports:
                values = box.tolist()  # a non-leader's one host sync
                if values[0] < 0:
                    raise RuntimeError("the job's leader got no answer from the regulator for this step (see its log)")
                answer = _Answer.unpacked(values, m)
        if failure is not None:
            raise failure
        assert answer is not None
        self._last = answer
        return answer

    def _answer_of(self, req: pb.ReportRequest, resp: Optional[pb.ReportResponse]) -> _Answer:
        if resp is not None:
            answer = _Answer.of(resp)
            if self._released_gains is not None:  # tanh and exp as the device rounds them (client/released.py)
                sums = [s.score_sum for s in req.stats]
                proximal = device_proximal(answer.proximal, sums, self._released_gains, self.probe.device)
                answer = _Answer(proximal, answer.grad_scale, answer.noise_scale, answer.window, duplicate=answer.duplicate)
            return answer
        last = self._last  # fallback: nothing or the last factors, reported late as applied
        answer = _Answer.neutral(len(self.modalities)) if self.delivery.mode == "neutral" else _Answer(
            last.proximal, last.grad_scale, last.noise_scale, (), answered=False
        )
        self._late = self.delivery.defer_fallback(req, answer.proximal, answer.grad_scale, answer.noise_scale)
        return answer

    # -- apply --------------------------------------------------------------------------------

    def _apply(self, answer: _Answer) -> None:
        job, step = self.identity.job_id, self._state.step
        self.probe.apply(answer.proximal, answer.grad_scale, answer.noise_scale, lambda i: noise_seed(job, step, i))

    # -- mixed precision ----------------------------------------------------------------------

    def _amp_skipped(self) -> bool:
        """fp16 with a GradScaler: unscales the gradients (unless the loop did), and says
        whether the scaler found inf/NaN, i.e. will skip this step."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return False
        from torch.amp.grad_scaler import OptState

        state = scaler._per_optimizer_states[id(self.optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("scaler.step(optimizer) ran before after_backward(): the hook must see the step's gradients first")
        if state["stage"] is OptState.READY:
            scaler.unscale_(self.optimizer)
        return sum(v.item() for v in state["found_inf_per_device"].values()) > 0

    def _skip(self, flight: _InFlight) -> StepResult:
        if flight.work is not None:
            flight.work.wait()
        self.timings.skipped += 1
        zeros = {m: 0.0 for m in self.modalities}
        return StepResult(step=self._state.step, epoch=self._state.epoch, proximal=zeros, window={},
                          duplicate=False, skipped=True, _modalities=self.modalities)

    # -- epochs and the session ---------------------------------------------------------------

    def on_epoch_end(self) -> Optional[pb.EndEpochResponse]:
        """Closes the epoch at the regulator, which decides the next epoch's window; the EndEpoch
        carries the last step's Fisher values. Under DDP the leader sends it and the other ranks
        receive its answer (one broadcast per epoch).

        None when the regulator was unreachable in a fallback mode (the epoch end is delivered
        later, in order)."""
        self._require_epoch("on_epoch_end")
        if self._flight is not None:
            raise RuntimeError("on_epoch_end() inside a step: after_forward() was not followed by after_backward()")
        if self.disabled:
            self._state.epoch += 1
            self._state.in_epoch = False
            return None
        t0 = time.perf_counter()
        resp: Optional[pb.EndEpochResponse] = None
        failure: Optional[BaseException] = None
        if self.reports:
            try:
                measured = self._settle()
                req = pb.EndEpochRequest(
                    job_id=self.identity.job_id, attempt=self.identity.attempt, rank=self.identity.rank,
                    epoch=self._state.epoch,
                )
                if measured:
                    req.measured.CopyFrom(measured[0])
                resp = self.delivery.end_epoch(req)
            except BaseException as exc:  # the other ranks must hear of it before this one raises
                failure = exc
        if self._distributed():
            import torch.distributed as dist

            box: list[Any] = [("failed", None) if failure is not None else ("ok", resp.SerializeToString() if resp else None)]
            dist.broadcast_object_list(box, src=self._leader, group=self.process_group, device=self._collective_device())
            status, payload = box[0]
            if status == "failed" and failure is None:
                raise RuntimeError("the job's leader could not close the epoch at the regulator (see its log)")
            resp = pb.EndEpochResponse.FromString(payload) if payload is not None else None
        if failure is not None:
            raise failure
        self.timings.epoch_s += time.perf_counter() - t0
        if self._trace is not None:
            self._trace.epoch_end(self._state.epoch)
        self._state.epoch += 1
        self._state.in_epoch = False
        if resp is not None:
            self._last_epoch_end = resp
            if self._state.snapshot is not None:
                regulation_snapshot.add_closed(self._state.snapshot, resp.closed)
        return resp

    def close(self) -> None:
        """Delivers deferred reports, closes the trace and (rank 0 by default) the session."""
        flight, self._flight = self._flight, None
        if flight is not None and flight.future is not None:  # a step abandoned mid-way
            try:
                flight.future.result()
            except Exception:
                log.warning("the report of an unfinished step failed", exc_info=True)
        if self._late is not None:  # the last step ran unanswered: its late report needs its values
            self._settle()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._trace is not None:
            self._trace.close()
            self._trace = None
        if self._state.session is None and not self._deferred:
            return
        delivered = self.delivery.flush()  # (a deferred OpenSession first, if the job started without one)
        if not delivered:
            log.error(
                "the regulator is unreachable: %d deferred message(s) of job %s were not delivered; "
                "its history lacks those steps",
                self.delivery.pending, self.identity.job_id,
            )
        elif self.close_session:
            self.client.close_session(self.identity.job_id, attempt=self.identity.attempt)
        self._state.session = None

    def __enter__(self) -> "InfoRegHook":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers --------------------------------------------------------------------------------

    def _require_epoch(self, what: str) -> None:
        if not self._state.in_epoch:
            raise RuntimeError(f"{what}() outside an epoch: call on_epoch_start() first")

    def _distributed(self) -> bool:
        if self._dist is None:
            self._dist = False
            if self.identity.world_size > 1:
                import torch.distributed as dist

                self._dist = dist.is_available() and dist.is_initialized()
                if self._dist:
                    pg = self.process_group
                    self._leader = dist.get_global_rank(pg, 0) if pg is not None else 0
                    self._reporter = dist.get_rank() == self._leader
        return self._dist

    def _collective_device(self) -> torch.device:
        """Where the job's process group wants tensors: CUDA for NCCL, the CPU otherwise."""
        import torch.distributed as dist

        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- checkpoints (issue 11.3; self-contained: state in, state out) ---------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the job stands, to save with the model and optimizer in a training checkpoint.

        ``epoch``/``step`` are the numbers of the next epoch and step (after ``on_epoch_end`` the
        epoch has moved on); ``in_epoch`` marks a checkpoint taken inside an epoch. ``snapshot``
        (once a session was opened) holds the session's profile and closed epochs, with which a
        regulator that lost the job - a preempted pod's new sidecar - continues it exactly
        (``snapshot.py``). Plain values only, so ``torch.save``/``torch.load(weights_only=True)``,
        Lightning and a Hugging Face trainer state (JSON) can store it."""
        st = self._state
        state: dict[str, Any] = {
            "format": 1,
            "job_id": self.identity.job_id,
            "attempt": self.identity.attempt,
            "modalities": list(self.modalities),
            "epoch": st.epoch,
            "step": st.step,
            "in_epoch": st.in_epoch,
        }
        if st.snapshot is not None:
            state["snapshot"] = regulation_snapshot.encode(st.snapshot)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues a job from ``state_dict()``; call before ``open()`` (or ``with hook:``).

        The session resumes at the checkpoint's epoch and step as the job's next attempt (the
        regulator assigns it, or the saved attempt + 1 when attempts are numbered by hand), and
        that attempt inherits the closed epochs before the checkpoint's epoch, so its windows
        are those of an uninterrupted run - from the regulator's own history, or, on a regulator
        that holds no attempt of the job (a preempted pod's new sidecar), from the checkpoint's
        ``snapshot`` of those epochs, which it restores. A checkpoint taken inside epoch e
        resumes at epoch e: the regulator's record of that epoch then holds only the steps after
        the resume, and ``on_epoch_start`` takes the anchors from the resumed weights."""
        import dataclasses

        if self._state.session is not None:
            raise RuntimeError("load_state_dict() must come before open(): the session resumes where the checkpoint stands")
        if state.get("format") != 1:
            raise ValueError(f"not an InfoRegHook state (format {state.get('format')!r})")
        if list(state["modalities"]) != list(self.modalities):
            raise ValueError(f"the checkpoint's modalities {list(state['modalities'])} differ from the hook's {list(self.modalities)}")
        if state["job_id"] != self.identity.job_id:
            raise ValueError(
                f"the checkpoint belongs to job {state['job_id']!r}, this hook to {self.identity.job_id!r}: "
                "pass the checkpoint's job_id to resume it"
            )
        epoch, step, saved = int(state["epoch"]), int(state["step"]), int(state["attempt"])
        if epoch < 0 or step < 0:
            raise ValueError(f"bad checkpoint position: epoch {epoch}, step {step}")
        text = state.get("snapshot")
        loaded = regulation_snapshot.decode(text, self.modalities) if text else None
        self.start_epoch = epoch
        self._state = _State(epoch=epoch, step=step, snapshot=loaded)
        if not getattr(self.identity, "next_attempt", False) and self.identity.attempt <= saved:
            self.identity = dataclasses.replace(self.identity, attempt=saved + 1)
