"""How requests reach the regulator: over gRPC, or in-process through the same API object.

Both transports take and return the wire-contract messages and raise the same domain errors,
so everything above them (client, hook, replay) is transport-agnostic.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence, TypeVar

import grpc

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc

from regulator_service.client_api import FileWatch, RetryLater, TokenSource, token_from_env

from .environment import report_stream_enabled
from .errors import InvalidArgument, Overloaded, from_rpc_error, shed
from .report_stream import ReportStreams, UseUnary
from .routing import job_metadata, routing_for

if TYPE_CHECKING:
    from regulator_service.client_api import RegulatorAPI

SERVICE = pb.DESCRIPTOR.services_by_name["Regulator"].full_name
SHED_BACKOFF_S = (0.05, 1.0)  # first and largest pause between retries of a shed call
T = TypeVar("T")

# Every Regulator RPC is idempotent by contract (per-step answers are stored), so UNAVAILABLE
# may be retried on all of them. Retries only work inside a methodConfig with a name list.
# RESOURCE_EXHAUSTED is not in the list: it is also a real quota (too many sessions), and a shed
# call is retried by ``GrpcTransport`` itself, which can tell the two apart (``Overloaded``).
DEFAULT_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


class Transport(Protocol):
    """Each call may take ``timeout`` (seconds) and ``wait_for_ready`` overrides."""

    def open_session(self, req: pb.OpenSessionRequest, **call: object) -> pb.OpenSessionResponse: ...
    def report(self, req: pb.ReportRequest, **call: object) -> pb.ReportResponse: ...
    def end_epoch(self, req: pb.EndEpochRequest, **call: object) -> pb.EndEpochResponse: ...
    def get_session(self, req: pb.GetSessionRequest) -> pb.GetSessionResponse: ...
    def list_sessions(self, req: pb.ListSessionsRequest) -> pb.ListSessionsResponse: ...
    def close_session(self, req: pb.CloseSessionRequest) -> pb.CloseSessionResponse: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class TlsConfig:
    """Client TLS: the CA that signed the server's certificate, and for mutual TLS this
    client's certificate and key (PEM files)."""

    ca: Optional[str] = None  # None = the system roots
    cert: Optional[str] = None
    key: Optional[str] = None
    server_name: Optional[str] = None  # override the name checked against the certificate

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Optional[str]) -> Optional[bytes]:
            return Path(path).read_bytes() if path else None

        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate and its key go together")
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    def paths(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in (self.ca, self.cert, self.key) if p)


def default_target(env: Optional[dict[str, str]] = None) -> str:
    env = dict(os.environ) if env is None else env
    return env.get("REGULATOR_TARGET") or "127.0.0.1:50051"


_HOST_PORT = re.compile(r"(?:dns:(?:///)?|ipv4:|ipv6:)?(\[[^\]]*\]|[^:\[\]/]*):(\d+)")


def checked_target(target: str) -> str:
    """``target``, unless its port is out of range: gRPC takes a port above 65535 modulo 65536
    (``127.0.0.1:115587`` reaches port 50051), which would send a typo to another service."""
    m = _HOST_PORT.fullmatch(target)
    if m and int(m.group(2)) > 65535:
        raise InvalidArgument(f"target {target!r}: {m.group(2)} is not a port (0 to 65535)")
    return target


def retry_while_shed(attempt: Callable[[float], T], budget_s: float, on_retry: Callable[[], None]) -> T:
    """``attempt(seconds left)`` until it does not raise ``Overloaded`` (a call shed before it
    ran), with exponential backoff and jitter, within ``budget_s``; after that the last
    ``Overloaded`` reaches the caller. ``on_retry`` counts the retries."""
    deadline = time.monotonic() + budget_s
    pause = SHED_BACKOFF_S[0]
    while True:
        try:
            return attempt(max(deadline - time.monotonic(), 0.001))
        except Overloaded:
            sleep = random.uniform(pause / 2, pause)
            if time.monotonic() + sleep >= deadline:
                raise
            time.sleep(sleep)
            pause = min(pause * 2, SHED_BACKOFF_S[1])
            on_retry()


class GrpcTransport:
    """A channel with a deadline on every call, retries of UNAVAILABLE, fast reconnects.

    The channel is created lazily and per process: a process forked after the first call (a
    DataLoader worker, say) never touches its parent's channel (grpc/grpc#32992) and opens its
    own on first use. The bearer token defaults to ``REGULATOR_TOKEN`` or the file named by
    ``REGULATOR_TOKEN_FILE``; ``unix:/path`` targets reach a sidecar's socket.

    A call the server sheds under load (``Overloaded``) is retried with exponential backoff and
    jitter until the call's own deadline, so a burst costs time, never an error; if the deadline
    passes first, ``Overloaded`` (an ``Unavailable``) reaches the caller, whose delivery mode
    decides (wait, neutral, last). TLS files (CA, client certificate and key) are checked every
    ``tls_recheck_s`` seconds; when they changed (a renewed certificate), the next call opens a
    channel with the new credentials.

    Reports go as the messages of one stream per job (``report_stream``; ``report_stream=False``
    or ``REGULATOR_REPORT_STREAM=off``: unary calls), with the same deadlines and errors.
    """

    def __init__(
        self,
        target: Optional[str] = None,
        *,
        timeout: float = 10.0,
        token: Optional[str] = None,
        tls: Optional[TlsConfig] = None,
        wait_for_ready: bool = False,
        max_reconnect_backoff_ms: int = 2000,
        service_config: Optional[dict] = None,
        options: Sequence[tuple[str, object]] = (),
        tls_recheck_s: float = 5.0,
        report_stream: Optional[bool] = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.target = checked_target(target or default_target())
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.tls = tls
        # an explicit token ("" = none) wins; else REGULATOR_TOKEN / REGULATOR_TOKEN_FILE (re-read)
        self._tokens = TokenSource(token=token) if token else None if token == "" else token_from_env()
        # several replicas named: each job's calls to one of them (ring_hash on the job header)
        self.routing = routing_for(self.target)
        self._options = [
            ("grpc.service_config", json.dumps(self.routing.service_config(service_config or DEFAULT_SERVICE_CONFIG))),
            ("grpc.enable_retries", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_ms),
            ("grpc.keepalive_time_ms", 30_000),
            *options,
        ]
        if tls is not None and tls.server_name:
            self._options.append(("grpc.ssl_target_name_override", tls.server_name))
        self._lock = threading.Lock()
        self._pid: Optional[int] = None
        self._channel: Optional[grpc.Channel] = None
        self._stub: Optional[pb_grpc.RegulatorStub] = None
        self._tls_watch = FileWatch(tls.paths(), tls_recheck_s) if tls is not None else None
        # The channel replaced after a certificate change; closed at the next change or close(),
        # so that calls still running on it (other threads) finish.
        self._retired: Optional[grpc.Channel] = None
        self.channels_opened = 0
        self.shed_retries = 0  # calls the server shed and this transport retried
        stream = report_stream_enabled() if report_stream is None else report_stream
        self.report_streams: Optional[ReportStreams] = ReportStreams(self.target) if stream else None

    def _metadata(self, req: object = None) -> Optional[tuple[tuple[str, str], ...]]:
        """The token, and the job header that routes a call about a job (``routing``)."""
        job = job_metadata(req.job_id) if isinstance(getattr(req, "job_id", None), str) else ()
        if self._tokens is None:
            return job or None
        return (("authorization", "Bearer " + self._tokens.current().decode()), *job)

    def _get_stub(self) -> pb_grpc.RegulatorStub:
        pid = os.getpid()
        stub = self._stub
        renewed = self._tls_watch is not None and stub is not None and self._tls_watch.changed()
        if stub is not None and self._pid == pid and not renewed:
            return stub
        with self._lock:
            if renewed and self._pid == pid and self._channel is not None:
                if self._retired is not None:
                    self._retired.close()
                self._retired, self._stub = self._channel, None
            if self._stub is None or self._pid != pid:
                # An inherited channel belongs to the parent: drop it without closing it.
                if self.tls is not None:
                    self._channel = grpc.secure_channel(self.target, self.tls.credentials(), options=self._options)
                else:
                    self._channel = grpc.insecure_channel(self.target, options=self._options)
                self._stub = pb_grpc.RegulatorStub(self._channel)
                self._pid = pid
                self.channels_opened += 1
            return self._stub

    def _call(self, method: str, req, timeout: Optional[float] = None, wait_for_ready: Optional[bool] = None):  # type: ignore[no-untyped-def]
        def attempt(seconds_left: float):  # type: ignore[no-untyped-def]
            fn = getattr(self._get_stub(), method)
            try:
                return fn(
                    req,
                    timeout=seconds_left,
                    metadata=self._metadata(req),
                    wait_for_ready=self.wait_for_ready if wait_for_ready is None else wait_for_ready,
                )
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None

        return retry_while_shed(attempt, self.timeout if timeout is None else timeout, self._count_retry)

    def _count_retry(self) -> None:
        self.shed_retries += 1

    def open_session(self, req: pb.OpenSessionRequest, **call: object) -> pb.OpenSessionResponse:
        return self._call("OpenSession", req, **call)  # type: ignore[arg-type]

    def report(self, req: pb.ReportRequest, **call: object) -> pb.ReportResponse:
        streams = self.report_streams
        if streams is None or not streams.wants_stream(req.job_id):
            return self._call("Report", req, **call)  # type: ignore[arg-type]
        budget = float(call.get("timeout") or self.timeout)  # type: ignore[arg-type]
        wait = call.get("wait_for_ready")
        wait = self.wait_for_ready if wait is None else bool(wait)
        deadline = time.monotonic() + budget

        def attempt(seconds_left: float) -> pb.ReportResponse:
            return streams.send(self._get_stub(), req, seconds_left, wait, lambda: self._metadata(req))

        try:
            return retry_while_shed(attempt, budget, self._count_retry)
        except UseUnary:  # an older server, or one with no room for a stream: this one goes unary
            return self._call("Report", req, timeout=max(deadline - time.monotonic(), 0.001), wait_for_ready=wait)

    def end_epoch(self, req: pb.EndEpochRequest, **call: object) -> pb.EndEpochResponse:
        return self._call("EndEpoch", req, **call)  # type: ignore[arg-type]

    def get_session(self, req: pb.GetSessionRequest) -> pb.GetSessionResponse:
        return self._call("GetSession", req)

    def list_sessions(self, req: pb.ListSessionsRequest) -> pb.ListSessionsResponse:
        return self._call("ListSessions", req)

    def close_session(self, req: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        resp = self._call("CloseSession", req)
        if self.report_streams is not None:
            self.report_streams.close_job(req.job_id)
        return resp

    def close(self) -> None:
        if self.report_streams is not None:
            self.report_streams.close()  # the server sees each stream end before the channel goes
        with self._lock:
            if self._pid == os.getpid():
                for channel in (self._channel, self._retired):
                    if channel is not None:
                        channel.close()
            self._channel = self._stub = self._retired = None
            self._pid = None


class InProcessTransport:
    """Runs the server's own API object in this process: no server, the same answers.

    Requests and answers cross a serialization round trip, as on the wire, so that nothing
    (a float32 field, a missing presence bit) can differ between the two transports. A history
    page refused because every read slot is taken is ``Overloaded`` and retried as the gRPC
    transport retries it, for up to ``shed_wait_s``.
    """

    def __init__(self, api: Optional["RegulatorAPI"] = None, shed_wait_s: float = 10.0) -> None:
        if api is None:
            from regulator_service.client_api import build_api

            api = build_api()
        if shed_wait_s <= 0:
            raise ValueError(f"shed_wait_s must be > 0, got {shed_wait_s}")
        self.api = api
        self.shed_wait_s = shed_wait_s
        self.shed_retries = 0  # history pages refused for want of a read slot and retried

    def _call(self, fn, req):  # type: ignore[no-untyped-def]
        resp = fn(type(req).FromString(req.SerializeToString()))
        return type(resp).FromString(resp.SerializeToString())

    def _count_retry(self) -> None:
        self.shed_retries += 1

    def open_session(self, req: pb.OpenSessionRequest, **call: object) -> pb.OpenSessionResponse:
        return self._call(self.api.open_session, req)

    def report(self, req: pb.ReportRequest, **call: object) -> pb.ReportResponse:
        return self._call(self.api.report, req)

    def end_epoch(self, req: pb.EndEpochRequest, **call: object) -> pb.EndEpochResponse:
        return self._call(self.api.end_epoch, req)

    def get_session(self, req: pb.GetSessionRequest) -> pb.GetSessionResponse:
        # the one call that can be refused for load (a history page, every read slot taken)
        def attempt(seconds_left: float) -> pb.GetSessionResponse:
            try:
                return self._call(self.api.get_session, req)
            except RetryLater as exc:  # what a remote client sees as a shed call
                raise shed(exc.message) from None

        return retry_while_shed(attempt, self.shed_wait_s, self._count_retry)

    def list_sessions(self, req: pb.ListSessionsRequest) -> pb.ListSessionsResponse:
        return self._call(self.api.list_sessions, req)

    def close_session(self, req: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        return self._call(self.api.close_session, req)

    def close(self) -> None:
        pass
