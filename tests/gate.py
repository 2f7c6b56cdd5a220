"""A gRPC pass-through in front of a regulator that can hold one job's calls: makes "this job is
still training while that one runs" a fact the test controls instead of a race it hopes to win.

Every call is forwarded as raw bytes (no decoding) to the real regulator, with its code and
message passed back; after ``hold_after`` Reports - unary calls or the messages of a
``ReportStream``, the client's default - every further one (a client's retries included) waits
at the gate until ``release()``.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Callable, Optional

import grpc


class Gate:
    def __init__(self, upstream: str, hold_after: int) -> None:
        self._channel = grpc.insecure_channel(upstream)
        self._hold_after = hold_after
        self._reports = 0
        self._lock = threading.Lock()
        self.holding = threading.Event()  # a Report is waiting at the gate
        self._open = threading.Event()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=[("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((_Forward(self),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _maybe_hold(self, method: str) -> None:
        if not method.endswith("/Report"):
            return
        with self._lock:
            self._reports += 1
            hold = self._reports > self._hold_after
        if hold:
            self.holding.set()
            self._open.wait()

    def forward(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        call = self._channel.unary_unary(method)  # bytes in, bytes out

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._maybe_hold(method)
            remaining: Optional[float] = context.time_remaining()
            try:
                return call(request, timeout=remaining, metadata=context.invocation_metadata())
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
            raise AssertionError("unreachable")

        return handle

    def forward_stream(self, method: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        """A ``ReportStream`` forwarded as a stream, each message held as a unary Report is."""
        call = self._channel.stream_stream(method)  # bytes in, bytes out

        def handle(requests: Any, context: grpc.ServicerContext) -> Any:
            def held() -> Any:
                for request in requests:
                    self._maybe_hold("/Report")
                    yield request

            upstream = call(held(), metadata=context.invocation_metadata())
            context.add_callback(upstream.cancel)  # the client gave up: so does the gate
            try:
                yield from upstream
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")

        return handle

    def release(self) -> None:
        self._open.set()

    def __enter__(self) -> "Gate":
        self._server.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
        self._server.stop(0).wait()
        self._channel.close()


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method.endswith("/ReportStream"):
            return grpc.stream_stream_rpc_method_handler(self._gate.forward_stream(details.method))
        return grpc.unary_unary_rpc_method_handler(self._gate.forward(details.method))
