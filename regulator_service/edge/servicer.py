"""The gRPC servicer: a thin shell that maps domain errors onto status codes.

All logic lives in ``api.RegulatorAPI``; this class only translates exceptions and counts
rejected reports. Unexpected exceptions become INTERNAL with the detail in the server log, never
a traceback on the wire.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, TypeVar

import grpc

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc

from ..wire.api import RegulatorAPI
from ..errors import RETRY_AFTER_KEY, RegulatorError
from .metrics import RegulatorMetrics

log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class RegulatorServicer(pb_grpc.RegulatorServicer):
    def __init__(
        self, api: RegulatorAPI, metrics: Optional[RegulatorMetrics] = None, unavailable: Optional[str] = None
    ) -> None:
        self._api = api
        self._metrics = metrics
        self._unavailable = unavailable  # why every call must fail (an unusable state store)

    def _call(
        self,
        fn: Callable[[Req], Resp],
        request: Req,
        context: grpc.ServicerContext,
        on_error: Optional[Callable[[], None]] = None,
    ) -> Resp:
        if self._unavailable is not None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"state store unusable: {self._unavailable}")
        try:
            return fn(request)
        except RegulatorError as exc:
            if on_error is not None:
                on_error()
            if exc.retry_after_ms is not None:  # the structural "retry later" the client decides on
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(exc.retry_after_ms)),))
            context.abort(exc.code, exc.message)
        except Exception:  # a bug: log it, do not leak it
            if on_error is not None:
                on_error()
            log.exception("internal error in %s", getattr(fn, "__name__", fn))
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the regulator's log")
        raise AssertionError("unreachable")  # context.abort always raises

    def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.ServicerContext) -> pb.OpenSessionResponse:
        return self._call(self._api.open_session, request, context)

    def Report(self, request: pb.ReportRequest, context: grpc.ServicerContext) -> pb.ReportResponse:
        rejected = self._metrics.report_rejected if self._metrics is not None else None
        return self._call(self._api.report, request, context, rejected)

    def EndEpoch(self, request: pb.EndEpochRequest, context: grpc.ServicerContext) -> pb.EndEpochResponse:
        return self._call(self._api.end_epoch, request, context)

    def GetSession(self, request: pb.GetSessionRequest, context: grpc.ServicerContext) -> bytes:
        # already serialized (cached history pages); see wire_handlers.add_regulator_servicer
        return self._call(self._api.get_session_bytes, request, context)

    def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.ServicerContext
    ) -> pb.ListSessionsResponse:
        return self._call(self._api.list_sessions, request, context)

    def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.ServicerContext
    ) -> pb.CloseSessionResponse:
        return self._call(self._api.close_session, request, context)
