"""``RegulatorClient``: the regulator's RPCs as plain Python calls over a transport."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from inforeg.regulator.v1 import regulator_pb2 as pb

from .profiles import ProfileLike, make_profile
from .transport import GrpcTransport, InProcessTransport, Transport

FisherLike = Union[float, pb.FisherTerms, tuple[float, float, float]]


def modality_stats(name: str, score_sum: float, fisher: FisherLike) -> pb.ModalityStats:
    """One modality's entry of a Report; ``fisher`` is a ready value or the three terms."""
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

    # -- sessions -------------------------------------------------------------------------------

    def open_session(
        self,
        job_id: str,
        modalities: Sequence[str],
        profile: ProfileLike = "paper",
        *,
        attempt: int = 0,
        world_size: int = 1,
        resume_epoch: int = 0,
        **profile_params: Any,
    ) -> pb.OpenSessionResponse:
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
    ) -> pb.ReportResponse:
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
            )
        )

    def end_epoch(self, job_id: str, *, attempt: int, epoch: int, rank: int = 0) -> pb.EndEpochResponse:
        return self.transport.end_epoch(
            pb.EndEpochRequest(job_id=job_id, attempt=attempt, rank=rank, epoch=epoch)
        )

    def get_session(
        self, job_id: str, attempt: Optional[int] = None, *, include_steps: bool = False
    ) -> pb.GetSessionResponse:
        req = pb.GetSessionRequest(job_id=job_id, include_steps=include_steps)
        if attempt is not None:
            req.attempt = attempt
        return self.transport.get_session(req)

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
