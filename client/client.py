"""``RegulatorClient``: the regulator's RPCs as plain Python calls over a transport."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from inforeg.regulator.v1 import regulator_pb2 as pb

from .profiles import ProfileLike, default_profile, make_profile
from .transport import GrpcTransport, InProcessTransport, Transport

FisherLike = Union[float, pb.FisherTerms, tuple[float, float, float], None]
Measured = tuple[int, Mapping[str, float]]  # (step, modality -> deferred Fisher value)
Request = Union[pb.OpenSessionRequest, pb.ReportRequest, pb.EndEpochRequest]


def modality_stats(name: str, score_sum: float, fisher: FisherLike) -> pb.ModalityStats:
    """One modality's entry of a Report; ``fisher`` is a ready value, the three terms, or None:
    deferred (the value follows in a later request's ``measured``)."""
    if fisher is None:
        return pb.ModalityStats(modality=name, score_sum=score_sum, fisher_deferred=True)
    if isinstance(fisher, pb.FisherTerms):
        return pb.ModalityStats(modality=name, score_sum=score_sum, fisher_terms=fisher)
    if isinstance(fisher, tuple):
        g2, gd, d2 = fisher
        return pb.ModalityStats(
            modality=name,
            score_sum=score_sum,
            fisher_terms=pb.FisherTerms(grad_sq=g2, grad_delta=gd, delta_sq=d2),
        )
    return pb.ModalityStats(modality=name, score_sum=score_sum, fisher=float(fisher))


def measured_fisher(step: int, values: Mapping[str, float]) -> pb.MeasuredFisher:
    """The deferred Fisher values of ``step``, per modality."""
    return pb.MeasuredFisher(
        step=step, modalities=[pb.ModalityFisher(modality=m, fisher=float(v)) for m, v in values.items()]
    )


class RegulatorClient:
    """Talks to one regulator. Thread-safe; every call carries a deadline (gRPC transport).

    >>> client = RegulatorClient.connect("127.0.0.1:50051")     # a running server
    >>> client = RegulatorClient.in_process()                    # no server at all
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    @classmethod
    def connect(cls, target: Optional[str] = None, **options: Any) -> "RegulatorClient":
        """``target`` defaults to ``REGULATOR_TARGET`` (else 127.0.0.1:50051); ``options`` go to
        ``GrpcTransport`` (timeout, token, tls, wait_for_ready, ...)."""
        return cls(GrpcTransport(target, **options))

    @classmethod
    def in_process(cls, api: Any = None) -> "RegulatorClient":
        return cls(InProcessTransport(api))

    @property
    def remote(self) -> bool:
        """Whether calls leave the process (a round trip worth overlapping with computation)."""
        return not isinstance(self.transport, InProcessTransport)

    @property
    def target(self) -> str:
        """Where calls go (the gRPC target, or ``in-process``), for messages."""
        return str(getattr(self.transport, "target", None) or "in-process")

    @property
    def timeout(self) -> Optional[float]:
        """The transport's default deadline per call (None: in-process, no deadline)."""
        return getattr(self.transport, "timeout", None)

    def send(self, req: Request, **call: Any) -> Any:
        """Sends a ready request (``OpenSessionRequest``, ``ReportRequest`` or
        ``EndEpochRequest``) with per-call options ``timeout`` and ``wait_for_ready``: the hook's
        way in, which builds its requests itself."""
        if isinstance(req, pb.ReportRequest):
            return self.transport.report(req, **call)
        if isinstance(req, pb.EndEpochRequest):
            return self.transport.end_epoch(req, **call)
        if isinstance(req, pb.OpenSessionRequest):
            return self.transport.open_session(req, **call)
        raise TypeError(f"cannot send a {type(req).__name__}")

    # -- sessions -------------------------------------------------------------------------------

    def open_session(
        self,
        job_id: str,
        modalities: Sequence[str],
        profile: ProfileLike = None,
        *,
        attempt: int = 0,
        world_size: int = 1,
        resume_epoch: int = 0,
        **profile_params: Any,
    ) -> pb.OpenSessionResponse:
        """``profile`` None: ``default_profile`` (``official`` for two modalities, else ``paper``)."""
        if profile is None:
            profile = default_profile(len(modalities))
        return self.transport.open_session(
            pb.OpenSessionRequest(
                job_id=job_id,
                attempt=attempt,
                world_size=world_size,
                modalities=list(modalities),
                profile=make_profile(profile, **profile_params),
                resume_epoch=resume_epoch,
            )
        )

    def report(
        self,
        job_id: str,
        *,
        attempt: int,
        epoch: int,
        step: int,
        count: int,
        score_sums: Mapping[str, float],
        fisher: Mapping[str, FisherLike],
        rank: int = 0,
        fallback: int = pb.FALLBACK_UNSPECIFIED,
        applied: Optional[Mapping[str, float]] = None,
        measured: Sequence[Measured] = (),
    ) -> pb.ReportResponse:
        """``fisher[m]`` None: deferred; ``measured``: deferred values of earlier steps (and of
        this one on a fallback report), as ``(step, {modality: value})`` in step order."""
        stats = [modality_stats(m, score_sums[m], fisher[m]) for m in score_sums]
        if applied is not None:
            for s in stats:
                s.applied.proximal = applied[s.modality]
        return self.transport.report(
            pb.ReportRequest(
                job_id=job_id,
                attempt=attempt,
                rank=rank,
                epoch=epoch,
                step=step,
                count=count,
                stats=stats,
                fallback=fallback,
                measured=[measured_fisher(step, values) for step, values in measured],
            )
        )

    def end_epoch(
        self, job_id: str, *, attempt: int, epoch: int, rank: int = 0, measured: Optional[Measured] = None
    ) -> pb.EndEpochResponse:
        """``measured``: the deferred Fisher values of the epoch's last step, if it is pending."""
        req = pb.EndEpochRequest(job_id=job_id, attempt=attempt, rank=rank, epoch=epoch)
        if measured is not None:
            req.measured.CopyFrom(measured_fisher(*measured))
        return self.transport.end_epoch(req)

    def get_session(
        self,
        job_id: str,
        attempt: Optional[int] = None,
        *,
        include_steps: bool = False,
        page_size: int = 0,
        on_page: Optional[Callable[[int, int], None]] = None,
    ) -> pb.GetSessionResponse:
        """A session's header and epochs; with ``include_steps`` every step too, fetched page by
        page (``page_size`` steps each, 0 = the server's maximum) and merged into one answer.
        ``on_page(steps_so_far, steps_in_all)`` is called after each page (progress output)."""
        pages = self.session_pages(job_id, attempt, include_steps=include_steps, page_size=page_size)
        first = next(pages)
        if on_page is not None and include_steps:
            on_page(len(first.steps), first.session.steps)
        for page in pages:
            first.steps.extend(page.steps)
            if on_page is not None:
                on_page(len(first.steps), first.session.steps)
        first.next_page_token = ""
        return first

    def session_pages(
        self, job_id: str, attempt: Optional[int] = None, *, include_steps: bool = True, page_size: int = 0
    ) -> Iterator[pb.GetSessionResponse]:
        """The answers of ``GetSession`` page by page: the first carries the session's header and
        epochs, every page a slice of its steps in step order. All pages come from the attempt of
        the first (a newer attempt opened meanwhile does not mix in)."""
        req = pb.GetSessionRequest(job_id=job_id, include_steps=include_steps, page_size=page_size)
        if attempt is not None:
            req.attempt = attempt
        page = self.transport.get_session(req)
        yield page
        while include_steps and page.next_page_token:
            req = pb.GetSessionRequest(
                job_id=job_id, attempt=page.session.attempt, include_steps=True,
                page_size=page_size, page_token=page.next_page_token,
            )
            page = self.transport.get_session(req)
            yield page

    def steps(self, job_id: str, attempt: Optional[int] = None, *, page_size: int = 0) -> Iterator[pb.StepRecord]:
        """Every recorded step of a session, in step order, one page in memory at a time."""
        for page in self.session_pages(job_id, attempt, include_steps=True, page_size=page_size):
            yield from page.steps

    def list_sessions(self, *, include_inactive: bool = False) -> list[pb.SessionInfo]:
        resp = self.transport.list_sessions(pb.ListSessionsRequest(include_inactive=include_inactive))
        return list(resp.sessions)

    def close_session(self, job_id: str, *, attempt: int) -> pb.SessionInfo:
        return self.transport.close_session(pb.CloseSessionRequest(job_id=job_id, attempt=attempt)).session

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "RegulatorClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
