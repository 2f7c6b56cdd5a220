"""The values one hook step hands along: the scores in flight, the regulator's answer, the Fisher
values waiting for the next request, and what the training loop gets back (``StepResult``).

Plain data, no behaviour beyond packing; ``step_exchange.StepExchange`` moves them between the
training thread and the report thread.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from inforeg.regulator.v1 import regulator_pb2 as pb


class PendingFisher:
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
    _measured: Optional[PendingFisher] = field(default=None, repr=False, compare=False)
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


@dataclass(frozen=True)
class Answer:
    """The factors every rank applies for one step."""

    proximal: tuple[float, ...]
    grad_scale: tuple[float, ...]
    noise_scale: tuple[float, ...]
    window: tuple[Optional[bool], ...] = ()  # () or None entries: unknown (fallback)
    answered: bool = True
    duplicate: bool = False

    @classmethod
    def neutral(cls, m: int) -> "Answer":
        return cls((0.0,) * m, (1.0,) * m, (0.0,) * m, (), answered=False)

    @classmethod
    def of(cls, resp: pb.ReportResponse) -> "Answer":
        f = [s.factors for s in resp.step.modalities]
        return cls(
            tuple(x.proximal for x in f),
            tuple(x.grad_scale if x.HasField("grad_scale") else 1.0 for x in f),
            tuple(x.noise_scale for x in f),
            tuple(w.open for w in resp.window),
            duplicate=resp.duplicate,
        )

    @property
    def scaled(self) -> bool:
        """Whether any modality's gradient is scaled or noised this step."""
        return any(k != 1.0 for k in self.grad_scale) or any(n != 0.0 for n in self.noise_scale)

    def packed(self) -> list[float]:
        """``[status, proximal.., grad_scale.., noise_scale.., window..]`` for the broadcast."""
        m = len(self.proximal)
        window = [(-1.0 if w is None else float(w)) for w in self.window] if self.window else [-1.0] * m
        return [1.0 if self.answered else 0.0, *self.proximal, *self.grad_scale, *self.noise_scale, *window]

    @classmethod
    def unpacked(cls, box: list[float], m: int) -> "Answer":
        window = tuple(None if w < 0 else bool(w) for w in box[1 + 3 * m : 1 + 4 * m])
        return cls(
            tuple(box[1 : 1 + m]), tuple(box[1 + m : 1 + 2 * m]), tuple(box[1 + 2 * m : 1 + 3 * m]),
            () if any(w is None for w in window) else window, answered=box[0] == 1.0,
        )


ReportOutcome = tuple[pb.ReportRequest, Optional[pb.ReportResponse]]


@dataclass
class InFlight:
    """A step between its scores and its answer: what the training thread hands the report
    thread (the scores, and the previous step's Fisher values to send with them), and what
    comes back (``future``, ``host``)."""

    epoch: int
    step: int
    local: Tensor  # [s_1..s_M] or [s_1..s_M, count] of this process (the leader's: summed over the job after ``work``)
    count: Optional[int] = None  # the local count when ``local`` does not carry it (no DDP)
    previous: Optional[PendingFisher] = None  # the last step's Fisher values, sent with this Report
    late: Optional[pb.ReportRequest] = None  # the last step's queued fallback report, which takes them instead
    work: Any = None  # DDP: the async reduce of the scores onto the leader
    armed: bool = False  # the report waits for the backward pass to begin (``ReportTrigger``)
    future: Optional["Future[ReportOutcome]"] = None
    host: Optional[list[float]] = None  # the leader's job-wide scores and count, once on the host
