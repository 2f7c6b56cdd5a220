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

The parts, each in its own module: ``step_exchange.StepExchange`` owns a step's exchange (its
order is written down there), ``hook_session.HookSession`` the session's calls (open, EndEpoch,
close), ``hook_state`` where the job stands and the checkpoint of it; this class is the façade
the training loop calls at its moments.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from inforeg.regulator.v1 import regulator_pb2 as pb

from .client import RegulatorClient
from .delivery import Delivery, DeliveryStats
from .environment import ClientEnvironment
from .grad_scaler import scaler_skips
from .hook_session import HookSession
from .hook_state import HookState, checkpoint, restore
from .identity import AttemptLike, JobIdentity
from .job_group import JobGroup
from .profiles import ProfileLike, default_profile, make_profile, scales_gradients
from .scores import Logits, Scores, step_scores, with_count
from .stats import DEFAULT_PROXIMAL, DEFAULT_SCALE, FISHER_MODULES, RELEASED, EncoderProbe, Selector, arithmetic_of
from .step_exchange import StepExchange
from .step_parts import Answer, HookTimings, StepResult
from .training_metrics import flat_metrics

OVERLAPS = (True, False, "auto", "backward")
__all__ = ["InfoRegHook", "StepResult", "HookTimings", "Logits", "Scores"]
_Answer = Answer  # (its name before the step's parts had a module of their own)


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
            backward pass (only with ``after_forward``): ``True`` starts it in ``after_forward``,
            ``"backward"`` when the backward pass begins (``report_trigger``), ``False`` runs it
            inline in ``after_backward``. ``"auto"`` (default): ``True`` when the client talks to
            a server, or the encoders are on a GPU (the thread also takes the host sync off the
            training loop); inline for an in-process regulator on a CPU job: its work is Python
            that needs the GIL, which the training thread needs too, the backward pass included
            (docs/performance.md).
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
        identity = JobIdentity.resolve(job_id, attempt, rank, world_size)
        name = default_profile(len(self.modalities)) if profile is None else profile
        self.profile = make_profile(name, **dict(profile_params or {}))
        self.probe = EncoderProbe(
            encoders, fisher_modules, proximal_params=proximal_params, scale_params=scale_params, fisher_dtype=fisher_dtype,
            arithmetic=arithmetic_of(self.profile),
        )
        self.record_path = record
        self.process_group = process_group
        self.keep_history = keep_history
        if overlap not in OVERLAPS:
            raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
        if overlap == "auto":
            overlap = bool(getattr(client, "remote", True)) or self.probe.device.type == "cuda"
        self.overlap: Union[bool, str] = overlap
        self.grad_scaler = grad_scaler
        self.optimizer = optimizer
        self.delivery = Delivery(client, env.mode(on_unavailable), call_timeout, wait_timeout, warn_every_s=warn_every_s)
        if start_epoch < 0 or start_step < 0:
            raise ValueError("start_epoch and start_step must be >= 0")
        self._state = HookState(identity, epoch=start_epoch, step=start_step, start_epoch=start_epoch)
        self._group = JobGroup(identity.world_size, process_group)
        self._exchange = StepExchange(
            self._state, self.modalities, self.probe, self._group, self.delivery,
            start=self._start_of(grad_scaler), keep_history=keep_history,
        )
        self._session = HookSession(
            client, self._state, self.profile, self.probe, self._group, self.delivery, self._exchange, record=record,
            close_session=identity.rank == 0 if close_session is None else close_session, disabled=self.disabled,
        )

    def _start_of(self, grad_scaler: Any) -> str:
        """When the step's report starts (``StepExchange``, from the ``overlap`` option). fp16
        with a GradScaler reports inline, once the scaler has said whether the step runs."""
        if grad_scaler is not None or not self.overlap:
            return "inline"
        return "backward" if self.overlap == "backward" else "forward"

    # -- where the job stands -----------------------------------------------------------------

    @property
    def identity(self) -> JobIdentity:
        """Job, attempt (assigned when the session opens with ``attempt="next"``), rank, world."""
        return self._state.identity

    @property
    def epoch(self) -> int:
        return self._state.epoch

    @property
    def step(self) -> int:
        """The next step's number (steps count from 0 within the job)."""
        return self._state.step

    @property
    def start_epoch(self) -> int:
        """The epoch the session resumes at (``start_epoch=``, or the checkpoint's)."""
        return self._state.start_epoch

    @property
    def session(self) -> Optional[pb.SessionInfo]:
        return self._state.session

    @property
    def history(self) -> list[StepResult]:
        return self._state.history

    @property
    def timings(self) -> HookTimings:
        return self._state.timings

    @timings.setter
    def timings(self, value: HookTimings) -> None:  # (a benchmark restarts the count)
        self._state.timings = value

    @property
    def close_session(self) -> bool:
        """Whether ``close()`` sends CloseSession (default: rank 0 only)."""
        return self._session.close_session

    @property
    def fallbacks(self) -> DeliveryStats:
        """Counts of steps applied without an answer, deferred epoch ends, waits."""
        return self.delivery.stats

    @property
    def reports(self) -> bool:
        """Whether this process sends the job's Reports (the leader under DDP, else always)."""
        return self._group.reports

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
            last_step=self._exchange.last if st.timings.steps else None,
            last_epoch_end=st.last_epoch_end,
            delivery=self.delivery.stats,
            scaled=scales_gradients(self.profile),
        )

    # -- the session --------------------------------------------------------------------------

    def open(self) -> Optional[pb.SessionInfo]:
        """Opens (or rejoins) the session of this job and attempt. In ``wait`` mode this waits
        for the regulator (up to ``wait_timeout``): a job does not start unregulated. In a
        fallback mode it tries for one call's deadline, then starts the job without a session
        (None; see ``on_unavailable``). With attempt ``"next"`` the regulator assigns it first (the
        leader asks, see ``agree_on_attempt``). ``REGULATOR_DISABLED``: None, nothing sent."""
        return self._session.open()

    def close(self) -> None:
        """Delivers deferred reports, closes the trace and (rank 0 by default) the session."""
        self._session.close()

    def __enter__(self) -> "InfoRegHook":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the training loop's moments ------------------------------------------------------------

    def on_epoch_start(self, epoch: Optional[int] = None) -> None:
        """Snapshots the encoders' weights as this epoch's proximal anchors."""
        if self._state.session is None:
            self.open()
        if epoch is not None and epoch != self._state.epoch:
            raise ValueError(f"epoch {epoch} starts out of order: the hook is at epoch {self._state.epoch}")
        if not self.disabled:
            self.probe.snapshot()
        self._state.in_epoch = True

    def after_forward(self, logits: Logits = None, labels: Optional[Tensor] = None, *,
                      scores: Scores = None, count: Optional[int] = None) -> None:
        """Call right after the forward pass, before ``backward()``: the step's scores go to the
        regulator in the background while the backward pass runs.

        Pass the unimodal ``logits`` (per modality) with the ``labels``, or ready per-modality
        ``scores`` (sums of true-class probabilities over the local batch) with ``count``."""
        self._state.require_epoch("after_forward")
        if self.disabled:
            return
        if self._exchange.flight is not None:
            raise RuntimeError("after_forward() twice in one step: call after_backward() after the backward pass")
        self._send(logits, labels, scores, count, early=True)

    def after_backward(self, logits: Logits = None, labels: Optional[Tensor] = None, *,
                       scores: Scores = None, count: Optional[int] = None) -> StepResult:
        """Call after ``loss.backward()`` and before ``optimizer.step()`` (and before clipping).

        Applies the regulator's answer to the encoders' gradients and measures the step's Fisher
        value. Give the scores here (``logits``/``labels`` or ``scores``/``count``, as for
        ``after_forward``) if ``after_forward`` was not called for this step."""
        self._state.require_epoch("after_backward")
        exchange = self._exchange
        if self.disabled:  # REGULATOR_DISABLED: nothing applied, nothing sent
            return exchange.unregulated()
        if logits is not None or scores is not None:
            if exchange.flight is not None:
                raise RuntimeError("this step's scores went to after_forward() already; call after_backward() without them")
            self._send(logits, labels, scores, count, early=False)
        elif exchange.flight is None:
            raise RuntimeError(
                "after_backward() without the step's scores: call after_forward(logits=..., labels=...) "
                "after the forward pass, or pass them here"
            )
        flight = exchange.take()
        if self.grad_scaler is not None and scaler_skips(self.grad_scaler, self.optimizer):
            return exchange.skip(flight)
        return exchange.finish(flight)

    def on_epoch_end(self) -> Optional[pb.EndEpochResponse]:
        """Closes the epoch at the regulator, which decides the next epoch's window; the EndEpoch
        carries the last step's Fisher values. Under DDP the leader sends it and the other ranks
        receive its answer (one broadcast per epoch).

        None when the regulator was unreachable in a fallback mode (the epoch end is delivered
        later, in order)."""
        st = self._state
        st.require_epoch("on_epoch_end")
        if self._exchange.flight is not None:
            raise RuntimeError("on_epoch_end() inside a step: after_forward() was not followed by after_backward()")
        if self.disabled:
            st.epoch += 1
            st.in_epoch = False
            return None
        return self._session.end_epoch()

    def local_scores(self, logits: Logits, labels: Optional[Tensor], *,
                     scores: Scores = None, count: Optional[int] = None) -> Tensor:
        """``[s_1..s_M, count]`` of this process's batch, float64 on the encoders' device
        (validated; integrations that accumulate micro-batches sum these)."""
        return with_count(*self._scores(logits, labels, scores, count))

    def _scores(self, logits: Logits, labels: Optional[Tensor], scores: Scores, count: Optional[int]) -> tuple[Tensor, float]:
        return step_scores(self.modalities, self.probe.device, logits, labels, scores=scores, count=count,
                           released=self.probe.arithmetic == RELEASED)

    def _send(self, logits: Logits, labels: Optional[Tensor], scores: Scores, count: Optional[int], early: bool) -> None:
        t0 = time.perf_counter()
        self._exchange.send(*self._scores(logits, labels, scores, count), early=early)
        self._state.timings.scores_s += time.perf_counter() - t0

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the job stands (next epoch and step, and the session's snapshot of its closed
        epochs), as plain values to save with the model and optimizer (``hook_state.checkpoint``)."""
        return checkpoint(self._state, self.modalities)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues a job from ``state_dict()`` as its next attempt, with the windows of an
        uninterrupted run, even on a regulator that lost the job; call before ``open()`` (or
        ``with hook:``). See ``hook_state.restore``."""
        restore(self._state, state, self.modalities)
