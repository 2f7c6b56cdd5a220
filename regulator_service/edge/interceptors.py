"""Server interceptors: go-grpc-prometheus metrics for every RPC (small and explicit instead of
py-grpc-prometheus, unmaintained and sync-only), undecodable requests turned into
INVALID_ARGUMENT, and an optional injected delay for fault tests."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Iterator, Optional

from google.protobuf.message import DecodeError

import grpc

from .metrics import UNKNOWN_METHOD, GrpcServerMetrics


def _counted(requests: Iterator[Any], inc: Callable[[], None]) -> Iterator[Any]:
    for request in requests:
        inc()
        yield request


_KINDS = {(False, False): "unary", (True, False): "client_stream", (False, True): "server_stream", (True, True): "bidi_stream"}


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


# grpc_code values as go-grpc-prometheus writes them (Go's codes.Code.String()), so that
# off-the-shelf gRPC dashboards and alerts match.
GO_CODE_NAMES = {
    code: ("Canceled" if code == grpc.StatusCode.CANCELLED else "OK" if code == grpc.StatusCode.OK
           else "".join(part.capitalize() for part in code.name.split("_")))
    for code in grpc.StatusCode
}


def _code(context: grpc.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code()
    if code is None:
        code = default
    return GO_CODE_NAMES.get(code, str(code)) if isinstance(code, grpc.StatusCode) else str(code)


def method_paths(services: Iterable[Any]) -> frozenset[str]:
    """``/package.Service/Method`` of every method of the given service descriptors."""
    return frozenset(f"/{s.full_name}/{m.name}" for s in services for m in s.methods)


class HandlerCache:
    """Wrapped handlers built once per inner handler, not once per call.

    grpcio runs the interceptors for every call on its one polling thread; building closures,
    handler tuples and metric label lookups there per call cost about 45 us a call (40% of a
    whole echo call). The handlers an interceptor sees come from a fixed set (the registered
    methods' handlers, the token interceptor's two refusal handlers), so caching by the inner
    handler's identity (and a label key) is bounded by the server, never by its callers; past
    ``limit`` entries it stops caching instead of growing (it would build per call, as before)."""

    def __init__(self, limit: int = 1024) -> None:
        self._entries: dict[tuple[int, Any], tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self._limit = limit

    def get(
        self, inner: grpc.RpcMethodHandler, key: Any, build: Callable[[], grpc.RpcMethodHandler]
    ) -> grpc.RpcMethodHandler:
        entry = self._entries.get((id(inner), key))
        if entry is not None and entry[0] is inner:  # the entry keeps ``inner`` alive: its id is not reused
            return entry[1]
        wrapped = build()
        if len(self._entries) < self._limit:
            self._entries[(id(inner), key)] = (inner, wrapped)
        return wrapped


class MetricsInterceptor(grpc.ServerInterceptor):
    """Outermost, so that refused calls (UNAUTHENTICATED, INVALID_ARGUMENT) are counted too.
    That is safe because label values come only from ``known`` (the registered methods): any
    other path, authenticated or not, is counted as ``unknown``/``unknown``, so the number of
    series is fixed by the server, never by its callers. The wrapped handler and its metric
    children are built once per method (``HandlerCache``). A call whose client left before
    its answer (deadline passed, or cancelled) is counted with the code its client got
    (DEADLINE_EXCEEDED, CANCELLED); ``count_unhandled`` counts the calls whose handler never ran
    (``admission.AdmissionPool``), and ``on_start`` tells the pool that a handler did."""

    def __init__(
        self, metrics: GrpcServerMetrics, known: frozenset[str], on_start: Optional[Callable[[], None]] = None
    ) -> None:
        self._m = metrics
        self._known = known
        self._cache = HandlerCache()
        self._on_start = on_start
        self._labels: dict[Optional[str], tuple[str, str, str]] = {}  # method (None: unknown) -> labels

    def count_unhandled(self, method: str, code: grpc.StatusCode) -> None:
        """A call that ended without its handler running (shed, or gone while it queued for a
        worker): started and handled with ``code``, under the labels its handler would have had."""
        name = method if method in self._known else None
        labels = self._labels.get(name)
        if labels is None:  # no call of this method reached its handler yet
            labels = ("unary", *_split(method)) if name is not None else ("unary", UNKNOWN_METHOD, UNKNOWN_METHOD)
        self._m.started.labels(*labels).inc()
        self._m.handled.labels(*labels, GO_CODE_NAMES.get(code, str(code))).inc()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Optional[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        handler = continuation(details)
        if handler is None:
            return None
        name = details.method if details.method in self._known else None
        return self._cache.get(handler, name, lambda: self._wrap(handler, name))

    def _wrap(self, handler: grpc.RpcMethodHandler, name: Optional[str]) -> grpc.RpcMethodHandler:
        if name is not None:
            service, method = _split(name)
        else:
            service = method = UNKNOWN_METHOD
        behavior, factory = _handler_parts(handler)
        kind = _KINDS[(handler.request_streaming, handler.response_streaming)]
        labels = (kind, service, method)
        self._labels[name] = labels
        m = self._m
        on_start = self._on_start
        started = m.started.labels(*labels)
        received = m.msg_received.labels(*labels)
        sent = m.msg_sent.labels(*labels)
        seconds = m.handling_seconds.labels(*labels)
        handled = {code: m.handled.labels(*labels, go) for code, go in GO_CODE_NAMES.items()}

        def done(context: grpc.ServicerContext, t0: float, default: grpc.StatusCode) -> None:
            if not context.is_active():  # the client left first: it got this, not our answer
                code = grpc.StatusCode.DEADLINE_EXCEEDED if context.time_remaining() <= 0 else grpc.StatusCode.CANCELLED
            else:
                code = context.code()
            if code is None:
                code = default
            child = handled.get(code) if isinstance(code, grpc.StatusCode) else None
            if child is None:  # not a StatusCode: labelled as it is
                child = m.handled.labels(*labels, _code(context, default))
            child.inc()
            seconds.observe(time.perf_counter() - t0)

        def wrapped(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            if on_start is not None:
                on_start()
            started.inc()
            t0 = time.perf_counter()
            if handler.request_streaming:
                request_or_iterator = _counted(request_or_iterator, received.inc)
            else:
                received.inc()
            if handler.response_streaming:
                return _stream(behavior(request_or_iterator, context), context, t0)
            try:
                response = behavior(request_or_iterator, context)
            except BaseException:
                done(context, t0, grpc.StatusCode.UNKNOWN)
                raise
            sent.inc()
            done(context, t0, grpc.StatusCode.OK)
            return response

        def _stream(responses: Any, context: grpc.ServicerContext, t0: float) -> Any:
            try:
                for response in responses:
                    sent.inc()
                    yield response
            except GeneratorExit:  # the client went away mid-stream
                done(context, t0, grpc.StatusCode.CANCELLED)
                raise
            except BaseException:
                done(context, t0, grpc.StatusCode.UNKNOWN)
                raise
            done(context, t0, grpc.StatusCode.OK)

        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _handler_parts(handler: grpc.RpcMethodHandler) -> tuple[Any, Callable[..., grpc.RpcMethodHandler]]:
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


class _Malformed:
    def __init__(self, error: str) -> None:
        self.error = error


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """A request that does not decode is INVALID_ARGUMENT (grpcio would answer INTERNAL).
    The wrapped handler is built once per inner handler (``HandlerCache``)."""

    def __init__(self) -> None:
        self._cache = HandlerCache()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Optional[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        handler = continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        return self._cache.get(handler, None, lambda: self._wrap(handler))

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserialize = handler.request_deserializer
        behavior, factory = _handler_parts(handler)

        def safe_deserialize(data: bytes) -> Any:
            try:
                return deserialize(data)
            except (DecodeError, ValueError, RuntimeError) as exc:
                return _Malformed(str(exc) or type(exc).__name__)

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request does not decode: {request.error}")
            return behavior(request, context)

        return factory(wrapped, request_deserializer=safe_deserialize, response_serializer=handler.response_serializer)


class DelayInterceptor(grpc.ServerInterceptor):
    """Fault injection for tests and drills (``serve --debug-delay``, ``--debug-hold-file``):
    every call to ``service`` (every message of a Report stream) sleeps first, as a saturated or
    swapping server would, and/or
    waits while ``hold_file`` exists (a call held for exactly as long as a test needs, not for
    a duration it hopes is long enough)."""

    HOLD_POLL_S = 0.01

    def __init__(self, seconds: float, service: str, hold_file: Optional[str] = None) -> None:
        self._seconds = seconds
        self._service = service
        self._hold_file = hold_file
        self._cache = HandlerCache()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Optional[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        handler = continuation(details)
        if handler is None or handler.request_streaming != handler.response_streaming:
            return handler
        if details.method.lstrip("/").rpartition("/")[0] != self._service:
            return handler
        return self._cache.get(handler, None, lambda: self._wrap(handler))

    def _pause(self, context: grpc.ServicerContext) -> None:
        while self._hold_file and os.path.exists(self._hold_file) and context.is_active():
            time.sleep(self.HOLD_POLL_S)
        if self._seconds > 0:
            time.sleep(self._seconds)

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        pause = self._pause
        if handler.request_streaming:  # a Report stream: each message is delayed as a unary call is
            messages = handler.stream_stream

            def slow_messages(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                def paused() -> Iterator[Any]:
                    for request in requests:
                        pause(context)
                        yield request

                return messages(paused(), context)

            return grpc.stream_stream_rpc_method_handler(
                slow_messages, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        behavior = handler.unary_unary

        def slow(request: Any, context: grpc.ServicerContext) -> Any:
            pause(context)
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            slow, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
