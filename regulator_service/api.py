"""The regulator's API in protobuf terms, independent of any transport.

The gRPC servicer is a thin shell around this class, and the client's in-process transport calls
it directly: both run exactly this code, so their answers are the same bits.
"""

from __future__ import annotations

from inforeg.regulator.v1 import regulator_pb2 as pb

from typing import Optional

from . import convert
from .errors import InvalidArgument
from .manager import SessionManager
from .model import Limits
from .policy import BUILTIN_PROFILES, ProfileRegistry
from .observer import SessionObserver
from .storage import MemoryStore, StateStore


class RegulatorAPI:
    def __init__(self, manager: SessionManager, profiles: ProfileRegistry = BUILTIN_PROFILES) -> None:
        self.manager = manager
        self.profiles = profiles  # the profiles OpenSession accepts

    def open_session(self, req: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        config = convert.config_from_request(req, self.manager.limits, self.profiles)
        view, created = self.manager.open(config)
        return pb.OpenSessionResponse(session=convert.session_info(view), created=created)

    def report(self, req: pb.ReportRequest) -> pb.ReportResponse:
        raw = convert.report_from_request(req)
        config, outcome = self.manager.report(raw)
        mods = config.modalities
        return pb.ReportResponse(
            step=convert.step_record(mods, outcome.record),
            window=convert.windows_to_proto(mods, outcome.window),
            duplicate=outcome.duplicate,
        )

    def end_epoch(self, req: pb.EndEpochRequest) -> pb.EndEpochResponse:
        key = convert.session_key(req.job_id, req.attempt)
        if req.epoch < 0:
            raise InvalidArgument(f"epoch must be >= 0, got {req.epoch}")
        config, outcome = self.manager.end_epoch(key, req.epoch)
        mods = config.modalities
        return pb.EndEpochResponse(
            closed=convert.epoch_record(mods, outcome.closed),
            next_epoch=outcome.next_epoch,
            next_window=convert.windows_to_proto(mods, outcome.next_window),
            duplicate=outcome.duplicate,
        )

    def get_session(self, req: pb.GetSessionRequest) -> pb.GetSessionResponse:
        job = convert.job_id(req.job_id)
        attempt = req.attempt if req.HasField("attempt") else None
        detail = self.manager.get(job, attempt, include_steps=req.include_steps)
        return convert.session_detail(detail)

    def list_sessions(self, req: pb.ListSessionsRequest) -> pb.ListSessionsResponse:
        if req.limit < 0:
            raise InvalidArgument(f"limit must be >= 0, got {req.limit}")
        views = self.manager.list(include_inactive=req.include_inactive, limit=req.limit)
        return pb.ListSessionsResponse(sessions=[convert.session_info(v) for v in views])

    def close_session(self, req: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        key = convert.session_key(req.job_id, req.attempt)
        return pb.CloseSessionResponse(session=convert.session_info(self.manager.close(key)))


def build_api(
    store: Optional[StateStore] = None,
    observer: Optional[SessionObserver] = None,
    limits: Limits = Limits(),
    profiles: ProfileRegistry = BUILTIN_PROFILES,
) -> RegulatorAPI:
    """The one composition of the regulator's core (store -> session manager -> API), used by
    the gRPC server and by the client's in-process transport alike. No store = in memory.
    ``profiles``: what OpenSession accepts (the built-ins, plus a server's plugins); a store
    that decodes stored profiles must be given the same registry."""
    return RegulatorAPI(
        SessionManager(store if store is not None else MemoryStore(), observer, limits=limits), profiles
    )
