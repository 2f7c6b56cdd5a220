"""Admission: at most ``limit`` RPCs held at once (running or queued for a worker); one more is
shed at once with RESOURCE_EXHAUSTED and the ``RETRY_AFTER_KEY`` trailing metadata.

grpcio's own ``maximum_concurrent_rpcs`` sheds with a fixed status and no metadata, which a
client cannot tell from grpcio's other RESOURCE_EXHAUSTED (a message over the size limit, never
worth a retry) except by its text. So the regulator counts admitted RPCs itself: ``AdmissionPool``
is the server's thread pool and counts the calls it holds (grpcio hands it one task per admitted
call, and the task's future ends with the call, even one cancelled before it ran);
``AdmissionInterceptor``, outermost, runs in grpcio's polling thread just before that hand-over,
so the count it reads is exact, and answers a full pool with ``SHED_HANDLER``, whose task the
pool runs on a small pool of its own: a shed call is answered at once, never queued behind the
work it could not join.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Callable, Optional

import grpc

from ..errors import RETRY_AFTER_KEY

SHED_RETRY_AFTER_MS = 50  # the pause a shed call is asked to wait before its retry
SHED_MESSAGE = "the regulator is at its --max-concurrent-rpcs limit; retry later"


def shed(request: Any, context: grpc.ServicerContext) -> None:
    """The behaviour of a call that was not admitted (the only use of this function object:
    ``AdmissionPool`` recognises its tasks by it)."""
    context.set_trailing_metadata(((RETRY_AFTER_KEY, str(SHED_RETRY_AFTER_MS)),))
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, SHED_MESSAGE)


SHED_HANDLER = grpc.unary_unary_rpc_method_handler(shed)  # raw bytes in: nothing is decoded


class AdmissionPool(futures.Executor):
    """The server's worker pool, counting the calls it holds; shed calls run apart."""

    def __init__(self, max_workers: int, limit: Optional[int], thread_name_prefix: str = "regulator-rpc") -> None:
        self.limit = limit  # None: unbounded
        self._work = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._shed = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{thread_name_prefix}-shed")
        self._lock = threading.Lock()
        self._held = 0

    @property
    def held(self) -> int:
        """Calls admitted and not finished (running or queued)."""
        return self._held

    def full(self) -> bool:
        return self.limit is not None and self._held >= self.limit

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:  # type: ignore[override]
        if any(a is shed for a in args):
            return self._shed.submit(fn, *args, **kwargs)
        with self._lock:
            self._held += 1
        try:
            future = self._work.submit(fn, *args, **kwargs)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _f: self._release())
        return future

    def _release(self) -> None:
        with self._lock:
            self._held -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._work.shutdown(wait=wait, cancel_futures=cancel_futures)
        self._shed.shutdown(wait=wait, cancel_futures=cancel_futures)


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Outermost interceptor: a call that finds the pool full gets ``SHED_HANDLER``. An unknown
    method stays UNIMPLEMENTED (grpcio's order: the method first, then admission)."""

    def __init__(self, pool: AdmissionPool) -> None:
        self._pool = pool

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Optional[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        handler = continuation(details)
        if handler is None or not self._pool.full():
            return handler
        return SHED_HANDLER
