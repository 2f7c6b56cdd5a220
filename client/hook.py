"""``InfoRegHook``: InfoReg regulation for a plain PyTorch training loop.

    hook = InfoRegHook(client, {"audio": model.audio_net, "visual": model.visual_net},
                       job_id="run-1", profile="official")
    with hook:                                   # OpenSession ... CloseSession
        for epoch in range(epochs):
            hook.on_epoch_start(epoch)           # anchors := encoder weights
            for x, y in loader:
                optimizer.zero_grad()
                loss = ...; loss.backward()
                hook.after_backward(logits={"audio": out_a, "visual": out_v}, labels=y)
                optimizer.step()                 # applies grad + beta_m * (w - w_anchor)
            hook.on_epoch_end()                  # EndEpoch: next epoch's window

Per step: scores and Fisher terms are computed on the trainer's device, combined over the
process group when torch.distributed is initialised (one small all-reduce of the scores; the
gradients, hence the Fisher terms, are already identical on every DDP rank), fetched with one
host sync, reported, and the returned coefficients are applied to the encoders' gradients.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from inforeg.regulator.v1 import regulator_pb2 as pb

from regulator_service.model import regulated_fisher

from .client import RegulatorClient, modality_stats
from .delivery import Delivery, DeliveryStats
from .identity import AttemptLike, JobIdentity, agree_on_attempt
from .profiles import ProfileLike, make_profile, profile_name
from .stats import FISHER_MODULES, EncoderProbe, score_sums
from .trace import TraceWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    step: int
    epoch: int
    proximal: dict[str, float]  # coefficients applied
    fisher: dict[str, float]  # the step's Fisher contribution as the regulator recorded it
    window: dict[str, bool]  # empty on a fallback step
    duplicate: bool
    fallback: bool = False  # the regulator did not answer in time; see ``on_unavailable``


@dataclass
class HookTimings:
    """Where the hook's time goes (seconds, summed over steps)."""

    steps: int = 0
    device_s: float = 0.0  # scores, Fisher terms, all-reduce and the host sync
    rpc_s: float = 0.0
    apply_s: float = 0.0
    epoch_rpc_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("steps", "device_s", "rpc_s", "apply_s", "epoch_rpc_s")}


@dataclass
class _State:
    epoch: int = 0
    step: int = 0
    in_epoch: bool = False
    session: Optional[pb.SessionInfo] = None
    history: list[StepResult] = field(default_factory=list)


class InfoRegHook:
    """Reports each step's statistics to a regulator and applies its proximal coefficients.

    Args:
        client: a ``RegulatorClient`` (remote or in-process).
        encoders: modality name -> encoder module, in the order the session declares them.
        job_id, attempt, rank, world_size: identity; defaults come from torch.distributed and
            the environment (see ``JobIdentity.resolve``). ``attempt="next"`` (the default
            outside torchrun, or ``REGULATOR_ATTEMPT=next``): the regulator assigns the attempt
            after the job's latest, so a retried process continues the job.
        profile: ``"paper"`` (default), ``"official"``, ``"none"`` or a ``pb.Profile``;
            ``profile_params`` are its parameters (e.g. ``reference_modality="audio"``).
        record: path of a statistics trace to write (replayable by ``regulator replay``).
        process_group: the group scores are combined over (default: the world, when initialised).
        keep_history: keep every ``StepResult`` in ``hook.history`` (per-rank logging, tests).
        close_session: send CloseSession on ``close()`` (default: rank 0 only).
        on_unavailable: ``"wait"`` (default: block up to ``wait_timeout`` s, then raise),
            ``"neutral"`` (zero coefficients) or ``"last"`` (last coefficients) after one
            ``call_timeout``; fallback steps are reported later and marked in the history.
            Under DDP the ranks agree with one extra tiny all-reduce per step (not in ``wait``
            mode), so they always apply the same coefficients.
        start_epoch, start_step: where an elastic restart resumes from its checkpoint. With a
            higher ``attempt`` the new session inherits the previous attempt's closed epochs
            before ``start_epoch`` (traces and windows), so regulation continues as if
            uninterrupted.
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
        profile: ProfileLike = "paper",
        profile_params: Optional[Mapping[str, Any]] = None,
        record: Union[str, os.PathLike[str], None] = None,
        process_group: Any = None,
        fisher_modules: tuple[type[nn.Module], ...] = FISHER_MODULES,
        keep_history: bool = False,
        close_session: Optional[bool] = None,
        on_unavailable: str = "wait",
        call_timeout: float = 10.0,
        wait_timeout: float = 300.0,
        start_epoch: int = 0,
        start_step: int = 0,
    ) -> None:
        if len(encoders) < 2:
            raise ValueError(f"InfoReg needs at least 2 modalities, got {list(encoders)}")
        self.client = client
        self.modalities = tuple(encoders)
        self.identity = JobIdentity.resolve(job_id, attempt, rank, world_size)
        self.profile = make_profile(profile, **dict(profile_params or {}))
        self.probe = EncoderProbe(encoders, fisher_modules)
        self.record_path = record
        self.process_group = process_group
        self.keep_history = keep_history
        self.close_session = self.identity.rank == 0 if close_session is None else close_session
        self.timings = HookTimings()
        self.delivery = Delivery(client.transport, on_unavailable, call_timeout, wait_timeout)
        if start_epoch < 0 or start_step < 0:
            raise ValueError("start_epoch and start_step must be >= 0")
        self.start_epoch = start_epoch
        self._state = _State(epoch=start_epoch, step=start_step)
        self._trace: Optional[TraceWriter] = None
        self._last = [0.0] * len(self.modalities)

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

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> pb.SessionInfo:
        """Opens (or rejoins) the session of this job and attempt. Whatever the mode, this waits
        for the regulator (up to ``wait_timeout``): a job does not start unregulated. With attempt
        ``"next"`` the regulator assigns it first (the leader asks, see ``agree_on_attempt``)."""
        if self.identity.next_attempt:
            token = uuid.uuid4().hex  # one per process start: a retried request gets the same attempt
            assigned = agree_on_attempt(
                lambda: self._open_session(next_attempt=True, open_token=token).attempt,
                distributed=self._distributed(), process_group=self.process_group, device=self.probe.device,
            )
            self.identity = self.identity.assigned(assigned)
        ident = self.identity
        session = self._open_session(attempt=ident.attempt)
        self._state.session = session
        if self.record_path is not None and self._trace is None and ident.rank == 0:
            ref = None
            if profile_name(session.profile) == "official":
                ref = session.profile.official.reference_modality
            self._trace = TraceWriter(self.record_path, self.modalities, ref)
        return session

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
        transport = self.client.transport
        return self.delivery.waiting(
            lambda timeout: transport.open_session(req, timeout=timeout, wait_for_ready=True),
            getattr(transport, "timeout", self.delivery.call_timeout),
        ).session

    def on_epoch_start(self, epoch: Optional[int] = None) -> None:
        """Snapshots the encoders' weights as this epoch's proximal anchors."""
        if self._state.session is None:
            self.open()
        if epoch is not None and epoch != self._state.epoch:
            raise ValueError(f"epoch {epoch} starts out of order: the hook is at epoch {self._state.epoch}")
        self.probe.snapshot()
        self._state.in_epoch = True

    def after_backward(
        self,
        logits: Union[Mapping[str, Tensor], Sequence[Tensor], None] = None,
        labels: Optional[Tensor] = None,
        *,
        scores: Union[Mapping[str, Union[float, Tensor]], None] = None,
        count: Optional[int] = None,
    ) -> StepResult:
        """Call after ``loss.backward()`` and before ``optimizer.step()``.

        Pass the unimodal ``logits`` (per modality) with the ``labels``, or ready per-modality
        ``scores`` (sums of true-class probabilities over the local batch) with ``count``.
        """
        if not self._state.in_epoch:
            raise RuntimeError("after_backward() outside an epoch: call on_epoch_start() first")
        t0 = time.perf_counter()
        local = self.local_scores(logits, labels, scores=scores, count=count)
        if self._distributed():
            import torch.distributed as dist

            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.process_group)
        deltas = self.probe.deltas()
        on_device = self.probe.fisher_terms(deltas)
        host = torch.cat([local, on_device.flatten()]).tolist()  # the step's single host sync
        t1 = time.perf_counter()
        m = len(self.modalities)
        total = int(round(host[m]))
        terms = [tuple(host[m + 1 + 3 * i : m + 4 + 3 * i]) for i in range(m)]
        st = self._state
        req = pb.ReportRequest(
            job_id=self.identity.job_id,
            attempt=self.identity.attempt,
            rank=self.identity.rank,
            epoch=st.epoch,
            step=st.step,
            count=total,
            stats=[modality_stats(name, host[i], terms[i]) for i, name in enumerate(self.modalities)],  # type: ignore[arg-type]
        )
        resp = self.delivery.report(req)
        if self.delivery.mode != "wait" and self._distributed():
            resp = resp if self._all_answered(resp is not None) else None
        t2 = time.perf_counter()
        if resp is not None:
            coefs = [s.factors.proximal for s in resp.step.modalities]
            fisher = {s.modality: s.fisher for s in resp.step.modalities}
            window = {w.modality: w.open for w in resp.window}
        else:  # fallback: the same arithmetic the regulator applies to late reports
            coefs = [0.0] * m if self.delivery.mode == "neutral" else list(self._last)
            self.delivery.defer_fallback(req, coefs)
            fisher = {name: regulated_fisher(*terms[i], coefs[i]) for i, name in enumerate(self.modalities)}  # type: ignore[misc]
            window = {}
        self._last = coefs
        self.probe.apply_proximal(coefs, deltas)
        t3 = time.perf_counter()
        result = StepResult(
            step=st.step,
            epoch=st.epoch,
            proximal=dict(zip(self.modalities, coefs)),
            fisher=fisher,
            window=window,
            duplicate=bool(resp is not None and resp.duplicate),
            fallback=resp is None,
        )
        if self._trace is not None:
            self._trace.step(st.epoch, st.step, total, {name: host[i] for i, name in enumerate(self.modalities)}, fisher)
        if self.keep_history:
            st.history.append(result)
        st.step += 1
        tm = self.timings
        tm.steps += 1
        tm.device_s += t1 - t0
        tm.rpc_s += t2 - t1
        tm.apply_s += t3 - t2
        return result

    def on_epoch_end(self) -> Optional[pb.EndEpochResponse]:
        """Closes the epoch at the regulator, which decides the next epoch's window.

        None when the regulator was unreachable in a fallback mode (the epoch end is delivered
        later, in order)."""
        if not self._state.in_epoch:
            raise RuntimeError("on_epoch_end() without on_epoch_start()")
        t0 = time.perf_counter()
        resp = self.delivery.end_epoch(
            pb.EndEpochRequest(
                job_id=self.identity.job_id, attempt=self.identity.attempt, rank=self.identity.rank, epoch=self._state.epoch
            )
        )
        self.timings.epoch_rpc_s += time.perf_counter() - t0
        if self._trace is not None:
            self._trace.epoch_end(self._state.epoch)
        self._state.epoch += 1
        self._state.in_epoch = False
        return resp

    def close(self) -> None:
        """Delivers deferred reports, closes the trace and (rank 0 by default) the session."""
        if self._trace is not None:
            self._trace.close()
            self._trace = None
        if self._state.session is None:
            return
        delivered = self.delivery.flush()
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

    def _all_answered(self, answered: bool) -> bool:
        """Under DDP in a fallback mode: did every rank get the regulator's answer?"""
        import torch.distributed as dist

        flag = torch.tensor([1.0 if answered else 0.0], device=self.probe.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.process_group)
        return bool(flag.item() == 1.0)

    def _distributed(self) -> bool:
        if self.identity.world_size <= 1:
            return False
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    def local_scores(
        self,
        logits: Union[Mapping[str, Tensor], Sequence[Tensor], None],
        labels: Optional[Tensor],
        *,
        scores: Union[Mapping[str, Union[float, Tensor]], None] = None,
        count: Optional[int] = None,
    ) -> Tensor:
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
            sums = score_sums(seq, labels).to(device)
            n = torch.tensor([float(labels.numel())], dtype=torch.float64, device=device)
            return torch.cat([sums, n])
        if scores is None or count is None:
            raise ValueError("pass logits and labels, or scores and count")
        if set(scores) != set(self.modalities):
            raise ValueError(f"scores for {sorted(scores)}, expected {sorted(self.modalities)}")
        vals = [torch.as_tensor(scores[m], dtype=torch.float64, device=device).reshape(()) for m in self.modalities]
        return torch.stack([*vals, torch.tensor(float(count), dtype=torch.float64, device=device)])
