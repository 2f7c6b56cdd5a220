"""The gRPC servicer: a thin shell that maps domain errors onto status codes.

All logic lives in ``api.RegulatorAPI``; this class only translates exceptions and counts
rejected reports. Unexpected exceptions become INTERNAL with the detail in the server log, never
a traceback on the wire.

``ReportStream`` answers each message of a job's stream with exactly what ``Report`` would
answer, in order, on the worker thread that holds the stream (no per-Report hand-off); the first
message that fails ends the stream with that message's status (and retry-after metadata).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import grpc

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc

from ..wire.api import RegulatorAPI
from ..errors import RETRY_AFTER_KEY, RegulatorError
from .metrics import RegulatorMetrics

log = logging.getLogger(__name__)
# The routing header a client sends with every call about a job (the client's
# routing.JOB_HEADER; tests/test_report_stream_server.py ties the two): it names a stream's job.
JOB_HEADER = "x-inforeg-job"
DRAINING_MESSAGE = "the regulator is shutting down; open a new stream (another replica answers) and resend"
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Undecodable:
    """A stream message that did not decode (``wire_handlers``): INVALID_ARGUMENT, as a unary
    request's (``interceptors.MalformedRequestInterceptor``), not grpcio's INTERNAL."""

    def __init__(self, error: str) -> None:
        self.error = error


def header_job(metadata: Optional[Sequence[tuple[str, Any]]]) -> Optional[str]:
    """The job a stream names in its ``JOB_HEADER`` request header, if any."""
    for key, value in metadata or ():
        if key == JOB_HEADER:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


class RegulatorServicer(pb_grpc.RegulatorServicer):
    def __init__(
        self, api: RegulatorAPI, metrics: Optional[RegulatorMetrics] = None, unavailable: Optional[str] = None
    ) -> None:
        self._api = api
        self._metrics = metrics
        self._unavailable = unavailable  # why every call must fail (an unusable state store)
        self.draining = threading.Event()  # set by the server's stop: streams end after their answer
        self._rejected = metrics.report_rejected if metrics is not None else None
        self._timers = metrics.report_timers if metrics is not None else None  # report_seconds, by rpc

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
        return self._report(request, context, "Report")

    def ReportStream(
        self, request_iterator: Iterator[pb.ReportRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ReportResponse]:
        """Each message answered as ``Report`` answers it, in order; every message must be of the
        stream's job (its header's, else its first message's). While the server drains, the
        message in hand is answered and the stream then ends with UNAVAILABLE."""
        if self._unavailable is not None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"state store unusable: {self._unavailable}")
        job = header_job(context.invocation_metadata())
        for request in request_iterator:
            if isinstance(request, Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request does not decode: {request.error}")
            if job is None:
                job = request.job_id
            yield self._report(request, context, "ReportStream", job)
            if self.draining.is_set():
                context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)

    def _report(
        self, request: pb.ReportRequest, context: grpc.ServicerContext, rpc: str, job: Optional[str] = None
    ) -> pb.ReportResponse:
        """One Report, however it came, timed from its request to its answer or error
        (``report_seconds{rpc}``); ``job``: the stream's, which the request must be of."""
        start = time.perf_counter()
        try:
            if job is not None and request.job_id != job:
                if self._rejected is not None:
                    self._rejected()
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"this stream carries the Reports of job {job!r}, not of job {request.job_id!r}: "
                    "open one stream per job",
                )
            return self._call(self._api.report, request, context, self._rejected)
        finally:
            if self._timers is not None:
                self._timers[rpc].observe(time.perf_counter() - start)

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
