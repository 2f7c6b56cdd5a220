"""Server interceptors: go-grpc-prometheus metrics for every RPC, including health and
reflection. Small and explicit instead of py-grpc-prometheus (unmaintained, sync-only)."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import grpc

from .metrics import GrpcServerMetrics, iter_counted


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _code(context: grpc.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code()
    if code is None:
        return default.name
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self._m = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Optional[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        handler = continuation(details)
        if handler is None:
            return None
        service, method = _split(details.method)
        if handler.request_streaming and handler.response_streaming:
            kind, behavior, factory = "bidi_stream", handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            kind, behavior, factory = "client_stream", handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            kind, behavior, factory = "server_stream", handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            kind, behavior, factory = "unary", handler.unary_unary, grpc.unary_unary_rpc_method_handler
        labels = (kind, service, method)
        m = self._m
        started = m.started.labels(*labels)
        received = m.msg_received.labels(*labels)
        sent = m.msg_sent.labels(*labels)
        seconds = m.handling_seconds.labels(*labels)

        def done(context: grpc.ServicerContext, t0: float, default: grpc.StatusCode) -> None:
            m.handled.labels(*labels, _code(context, default)).inc()
            seconds.observe(time.perf_counter() - t0)

        def wrapped(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            started.inc()
            t0 = time.perf_counter()
            if handler.request_streaming:
                request_or_iterator = iter_counted(request_or_iterator, received.inc)
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
