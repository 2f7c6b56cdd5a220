"""The regulator's API in protobuf terms, independent of any transport.

The gRPC servicer is a thin shell around this class, and the client's in-process transport calls
it directly: both run exactly this code, so their answers are the same bits.
"""

from __future__ import annotations

from inforeg.regulator.v1 import regulator_pb2 as pb

from typing import Optional

from . import convert
from ..capacity import history
from ..errors import InvalidArgument
from ..core.manager import SessionManager
from ..model import Limits, SessionView
from ..capacity.read_pacing import ReadPacer
from ..policy import BUILTIN_PROFILES, ProfileRegistry
from ..core.observer import SessionObserver
from ..core.ownership import Ownership
from ..storage import MemoryStore, StateStore


class RegulatorAPI:
    def __init__(self, manager: SessionManager, profiles: ProfileRegistry = BUILTIN_PROFILES) -> None:
        self.manager = manager
        self.profiles = profiles  # the profiles OpenSession accepts
        limits = manager.limits
        self.read_pacer = ReadPacer(limits.history_read_rate, limits.max_history_readers)

    def open_session(self, req: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        config = convert.config_from_request(req, self.manager.limits, self.profiles)
        snapshot = convert.snapshot_from_request(req, config, self.profiles) if req.HasField("snapshot") else ()
        view, created = self.manager.open(config, next_attempt=req.next_attempt, snapshot=snapshot)
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
        measured = convert.measured_from_proto(req.measured) if req.HasField("measured") else None
        config, outcome = self.manager.end_epoch(key, convert.epoch_number(req.epoch), measured)
        mods = config.modalities
        return pb.EndEpochResponse(
            closed=convert.epoch_record(mods, outcome.closed),
            next_epoch=outcome.next_epoch,
            next_window=convert.windows_to_proto(mods, outcome.next_window),
            duplicate=outcome.duplicate,
        )

    def get_session(self, req: pb.GetSessionRequest) -> pb.GetSessionResponse:
        return pb.GetSessionResponse.FromString(self.get_session_bytes(req))

    def get_session_bytes(self, req: pb.GetSessionRequest) -> bytes:
        """A serialized ``GetSessionResponse``; a page of steps holds one of the paced history
        read slots (``read_pacing.py``) while it is built and while its bytes are paid for."""
        if not req.include_steps:
            return self._session_bytes(req)
        with self.read_pacer.slot():  # HistoryBusy (RESOURCE_EXHAUSTED, retried by clients) when full
            data = self._session_bytes(req)
            self.read_pacer.pace(len(data))
            return data

    def _session_bytes(self, req: pb.GetSessionRequest) -> bytes:
        """The response assembled from its fields: steps come as cached
        wire bytes (``history.py``), so a page costs no message building under the GIL, and no
        session lock is held while it is put together.

        Paging: ``page_size`` 0 (an older client) or above the maximum is the maximum
        (``history.MAX_PAGE_STEPS``, and never more than ``history.MAX_PAGE_BYTES``); the token
        names the attempt, so all pages come from one session; epochs come on the first page."""
        job = convert.job_id(req.job_id)
        attempt: Optional[int] = req.attempt if req.HasField("attempt") else None
        if req.page_size < 0:
            raise InvalidArgument(f"page_size must be >= 0, got {req.page_size}")
        start = 0
        if req.page_token:
            if not req.include_steps:
                raise InvalidArgument("page_token pages through steps: set include_steps")
            token_attempt, start = history.parse_token(req.page_token)
            if attempt is not None and attempt != token_attempt:
                raise InvalidArgument(
                    f"page_token belongs to attempt {token_attempt}, not to the requested attempt {attempt}"
                )
            attempt = token_attempt
        snap = self.manager.snapshot(job, attempt)
        mods = snap.view.config.modalities
        parts = [history.field_bytes(1, convert.session_info(snap.view).SerializeToString())]
        if not req.page_token:
            *closed, current = snap.epochs
            encode_epoch = lambda e: convert.epoch_record(mods, e).SerializeToString()  # noqa: E731
            parts.append(self.manager.closed_epochs(snap, closed, encode_epoch))
            parts.append(history.field_bytes(2, encode_epoch(current)))
        if req.include_steps:
            size = min(req.page_size or history.MAX_PAGE_STEPS, history.MAX_PAGE_STEPS)
            room = history.MAX_PAGE_BYTES - sum(len(p) for p in parts)  # a long epoch list leaves fewer steps
            page = self.manager.history_page(
                snap, start, size, lambda r: convert.step_record(mods, r).SerializeToString(), max(room, 0)
            )
            parts.append(page.data)
            if page.next_step is not None:
                token = history.make_token(snap.key.attempt, page.next_step)
                parts.append(history.field_bytes(4, token.encode()))
        if snap.steps_pruned_ms:
            parts.append(history.varint_field(5, snap.steps_pruned_ms))
        return b"".join(parts)

    def list_sessions(self, req: pb.ListSessionsRequest) -> pb.ListSessionsResponse:
        if req.limit < 0:
            raise InvalidArgument(f"limit must be >= 0, got {req.limit}")
        views = self.manager.list(include_inactive=req.include_inactive, limit=req.limit)
        return pb.ListSessionsResponse(
            sessions=[convert.session_info(v) if isinstance(v, SessionView) else convert.quarantined_info(v) for v in views]
        )

    def close_session(self, req: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        key = convert.session_key(req.job_id, req.attempt)
        return pb.CloseSessionResponse(session=convert.session_info(self.manager.close(key)))


def build_api(
    store: Optional[StateStore] = None,
    observer: Optional[SessionObserver] = None,
    limits: Limits = Limits(),
    profiles: ProfileRegistry = BUILTIN_PROFILES,
    ownership: Optional[Ownership] = None,
) -> RegulatorAPI:
    """The one composition of the regulator's core (store -> session manager -> API), used by
    the gRPC server and by the client's in-process transport alike. No store = in memory.
    ``profiles``: what OpenSession accepts (the built-ins, plus a server's plugins); a store
    that decodes stored profiles must be given the same registry. ``ownership``: several
    replicas share the store (``core/ownership.py``)."""
    return RegulatorAPI(
        # no store: the in-process client's, whose history is its caller's own memory, outside the budget
        SessionManager(store if store is not None else MemoryStore(in_budget=False), observer, limits=limits, ownership=ownership),
        profiles,
    )
