"""Admission: at most ``limit`` RPCs held at once (running or queued for a worker); one more is
shed at once with RESOURCE_EXHAUSTED and the ``RETRY_AFTER_KEY`` trailing metadata; and every
call that ends without its handler running is still counted.

grpcio's own ``maximum_concurrent_rpcs`` sheds with a fixed status and no metadata, which a
client cannot tell from grpcio's other RESOURCE_EXHAUSTED (a message over the size limit, never
worth a retry) except by its text. So the regulator counts admitted RPCs itself: ``AdmissionPool``
is the server's thread pool and counts the calls it holds (grpcio hands it one task per admitted
call, and the task's future ends with the call, even one cancelled before it ran);
``AdmissionInterceptor``, outermost, runs in grpcio's polling thread just before that hand-over,
so the count it reads is exact, and answers a full pool with the pool's shed handler, whose task
the pool runs on a small pool of its own: a shed call is answered at once, never queued behind
the work it could not join.

Before any of that, grpc core queues the calls that arrived and that grpcio's polling thread has
not asked for yet; past its backlog limits (1,000 soft, 3,000 hard by default) it refuses calls
itself, and the client sees CANCELLED from a call the regulator never saw (36-57% of a
30,000-Report open-loop burst). ``core_backlog_options`` raises those limits (``--max-pending-calls``)
so that a burst reaches admission and is shed with RESOURCE_EXHAUSTED.

Counting: a shed call, and an admitted call that grpcio never handed to its handler (its client
cancelled or its deadline passed while it waited for a worker), are reported to
``count_unhandled`` (the server's ``grpc_server_handled_total``, ``MetricsInterceptor``); a
handler marks its task as run with ``handler_started``.

Streams (``ReportStream``): grpcio's synchronous server holds one worker thread for as long as a
stream is open, so streams run on a pool of their own, ``max_streams`` threads beside the
``max_workers`` of unary calls, and are counted apart: an open stream holds no
``--max-concurrent-rpcs`` slot (unary calls - OpenSession, EndEpoch, the reads - never starve
behind streams), and a stream opened while ``max_streams`` are open (or with ``max_streams`` 0)
is refused at once with RESOURCE_EXHAUSTED and ``STREAMS_FULL_MESSAGE``: its client sends unary
Reports instead, which unary admission then counts one by one.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any, Callable, Optional

import grpc

from ..errors import RETRY_AFTER_KEY
from .interceptors import HandlerCache

SHED_RETRY_AFTER_MS = 50  # the pause a shed call is asked to wait before its retry
SHED_MESSAGE = "the regulator is at its --max-concurrent-rpcs limit; retry later"
STREAMS_FULL_MESSAGE = "the regulator holds its --max-streams limit of open Report streams; send unary Reports"
DEFAULT_MAX_STREAMS = 256  # open Report streams (one per training job talking to this replica)
# Calls grpc core may queue before grpcio's polling thread takes them (``--max-pending-calls``;
# core's own defaults, 1,000 soft and 3,000 hard, cancel the rest of a burst before the regulator
# sees it). Large enough for a 30,000-call burst to reach admission and be shed; bounded, because
# each queued call holds memory in core (about 13 KiB for a Report, measured: docs/operations.md).
CORE_BACKLOG_LIMIT = 32768
# How long a call may wait there before core cancels it, unseen (core's default: 30 s). Admitted
# calls drain that queue at the server's service rate: 30,000 Reports sent at once waited up to
# 29 s on a 2-core machine, too close to 30.
CORE_BACKLOG_MAX_AGE_S = 120

# (method path, the status its client got) -> None: counts a call whose handler never ran
CountUnhandled = Callable[[str, grpc.StatusCode], None]


def core_backlog_options(limit: int = CORE_BACKLOG_LIMIT) -> list[tuple[str, int]]:
    """grpc server options: core's queue of calls not yet taken by grpcio raised to ``limit``
    calls and ``CORE_BACKLOG_MAX_AGE_S``."""
    return [
        ("grpc.server.max_pending_requests", limit),
        ("grpc.server.max_pending_requests_hard_limit", limit),
        ("grpc.server_max_unrequested_time_in_server", CORE_BACKLOG_MAX_AGE_S),
    ]


def _call_event(args: tuple[Any, ...]) -> Any:
    """grpcio's call event among a task's arguments (it carries the method and deadline)."""
    return next((a for a in args if hasattr(a, "call_details")), None)


def _method_and_code(args: tuple[Any, ...], shed_answered: bool) -> Optional[tuple[str, grpc.StatusCode]]:
    """(method path, the status a call whose handler did not run ended with):
    RESOURCE_EXHAUSTED if it was shed, else DEADLINE_EXCEEDED once its deadline passed, else
    CANCELLED (its client left); None when the task carries no call event."""
    event = _call_event(args)
    if event is None:
        return None
    details = event.call_details
    method = details.method or event.tag  # a registered method's call names it by its tag only
    method = method.decode(errors="replace") if isinstance(method, bytes) else str(method)
    if shed_answered:
        return method, grpc.StatusCode.RESOURCE_EXHAUSTED
    expired = details.deadline is not None and details.deadline <= time.time()
    return method, grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


class StreamBehavior:
    """A stream handler's behaviour, marked so that the pool runs its task on the stream pool."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner

    def __call__(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        return self.inner(request_iterator, context)


class AdmissionPool(futures.Executor):
    """The server's worker pool, counting the calls it holds; shed calls run apart, and streams
    on ``max_streams`` threads of their own. Every task whose handler did not run (shed, or
    cancelled before a worker took it) goes to ``count_unhandled`` once assembly has wired it."""

    def __init__(
        self,
        max_workers: int,
        limit: Optional[int],
        thread_name_prefix: str = "regulator-rpc",
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        self.limit = limit  # None: unbounded
        self.max_streams = max_streams
        self.count_unhandled: Optional[CountUnhandled] = None
        self._work = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._shed = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{thread_name_prefix}-shed")
        self._streams = futures.ThreadPoolExecutor(max_workers=max(max_streams, 1), thread_name_prefix=f"{thread_name_prefix}-stream")
        self._lock = threading.Lock()
        self._held = 0
        self._streams_open = 0
        self._ran = threading.local()  # per worker thread: did the current task's handler start?
        self._shed_behavior = self._shed_call  # one bound method: tasks are recognised by identity
        self._refuse_stream_behavior = self._refuse_stream
        self.shed_handler = grpc.unary_unary_rpc_method_handler(self._shed_behavior)  # raw bytes: nothing decoded
        self.streams_full_handler = grpc.stream_stream_rpc_method_handler(self._refuse_stream_behavior)

    @property
    def held(self) -> int:
        """Unary calls admitted and not finished (running or queued)."""
        return self._held

    @property
    def streams_open(self) -> int:
        """Streams admitted and not finished (the ``report_streams_open`` gauge)."""
        return self._streams_open

    def full(self) -> bool:
        return self.limit is not None and self._held >= self.limit

    def streams_full(self) -> bool:
        return self._streams_open >= self.max_streams

    def handler_started(self) -> None:
        """Called by the handler of the task this thread runs (``MetricsInterceptor``)."""
        self._ran.value = True

    def _shed_call(self, request: Any, context: grpc.ServicerContext) -> None:
        """The behaviour of a call that was not admitted."""
        self._ran.value = True
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(SHED_RETRY_AFTER_MS)),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, SHED_MESSAGE)

    def _refuse_stream(self, request_iterator: Any, context: grpc.ServicerContext) -> None:
        """The behaviour of a stream opened while ``max_streams`` are open."""
        self._ran.value = True
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, STREAMS_FULL_MESSAGE)

    def _run(self, shed: bool, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``fn`` (grpcio's task for one call), then the count of a call whose handler did not
        run: a shed call is counted here too (RESOURCE_EXHAUSTED), the handler of an admitted
        call counts itself."""
        self._ran.value = False
        try:
            return fn(*args, **kwargs)
        finally:
            count, ran = self.count_unhandled, self._ran.value
            if count is not None and (shed or not ran):
                found = _method_and_code(args, shed_answered=shed and ran)
                if found is not None:
                    count(*found)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:  # type: ignore[override]
        stream = False
        for a in args:
            if a is self._shed_behavior or a is self._refuse_stream_behavior:
                return self._shed.submit(self._run, True, fn, args, kwargs)
            if isinstance(a, StreamBehavior):
                stream = True
        with self._lock:
            if stream:
                self._streams_open += 1
            else:
                self._held += 1
        try:
            future = (self._streams if stream else self._work).submit(self._run, False, fn, args, kwargs)
        except BaseException:
            self._release(stream)
            raise
        future.add_done_callback(lambda _f: self._release(stream))
        return future

    def _release(self, stream: bool = False) -> None:
        with self._lock:
            if stream:
                self._streams_open -= 1
            else:
                self._held -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._work.shutdown(wait=wait, cancel_futures=cancel_futures)
        self._streams.shutdown(wait=wait, cancel_futures=cancel_futures)
        self._shed.shutdown(wait=wait, cancel_futures=cancel_futures)


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Outermost interceptor: a call that finds the pool full gets the pool's shed handler, a
    stream that finds ``max_streams`` open its refusal; an admitted stream's behaviour is marked
    (``StreamBehavior``, built once per handler) for the stream pool. An unknown method stays
    UNIMPLEMENTED (grpcio's order: the method first, then admission)."""

    def __init__(self, pool: AdmissionPool) -> None:
        self._pool = pool
        self._streams = HandlerCache()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Optional[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        handler = continuation(details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return self._pool.streams_full_handler if self._pool.streams_full() else self._stream(handler)
        if not self._pool.full():
            return handler
        return self._pool.shed_handler

    def _stream(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` with its behaviour marked; built once per inner handler (a fixed set)."""
        return self._streams.get(handler, None, lambda: grpc.stream_stream_rpc_method_handler(
            StreamBehavior(handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        ))
