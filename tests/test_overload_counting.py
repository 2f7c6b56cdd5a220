"""Overload without silent CANCELLED: the regulator's admission and metrics parts
(``edge/admission.py``, ``MetricsInterceptor``) in a real grpcio server on loopback.

A ``Gate`` interceptor, outermost, holds grpcio's polling thread: every call that arrives
meanwhile waits in grpc core's queue of not-yet-requested calls, exactly where an open-loop
burst waits while the polling thread is busy. That makes the backlog, and the deadlines that
pass inside it, a matter of the test's own synchronisation instead of machine speed."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import grpc
import pytest
from prometheus_client import CollectorRegistry

from regulator_service.edge.admission import AdmissionInterceptor, AdmissionPool, core_backlog_options
from regulator_service.edge.interceptors import MetricsInterceptor
from regulator_service.edge.metrics import GrpcServerMetrics
from regulator_service.errors import RETRY_AFTER_KEY

METHOD = "/test.Echo/Call"
KNOWN = frozenset({METHOD})
CORE_DEFAULT_HARD_LIMIT = 3000  # grpc core's own backlog limit, the one the regulator raises
SETTLE_S = 2.0  # time for the client to put a burst on the wire while the gate is shut


class Gate(grpc.ServerInterceptor):
    """Holds grpcio's polling thread (the interceptors run on it) while shut."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.reached = threading.Event()

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        if not self.open.is_set():
            self.reached.set()
            self.open.wait(120)
        return continuation(details)


class Served:
    def __init__(self, limit: int, behavior: Callable[[bytes, grpc.ServicerContext], bytes], backlog: Optional[int]) -> None:
        self.registry = CollectorRegistry()
        self.pool = AdmissionPool(max_workers=1, limit=limit)
        counting = MetricsInterceptor(GrpcServerMetrics(self.registry), KNOWN, self.pool.handler_started)
        self.pool.count_unhandled = counting.count_unhandled
        self.gate = Gate()
        self.gate.open.set()
        options = core_backlog_options(backlog) if backlog else []
        self.server = grpc.server(self.pool, interceptors=[self.gate, AdmissionInterceptor(self.pool), counting], options=options)
        handler = grpc.unary_unary_rpc_method_handler(behavior)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {"Call": handler})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def handled(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for family in self.registry.collect():
            for s in family.samples:
                if s.name == "grpc_server_handled_total" and s.value:
                    out[s.labels["grpc_code"]] = int(s.value)
        return out

    def started(self) -> int:
        value = self.registry.get_sample_value(
            "grpc_server_started_total", {"grpc_type": "unary", "grpc_service": "test.Echo", "grpc_method": "Call"}
        )
        return int(value or 0)


def settle(served: Served, total: int) -> None:
    """Waits until the server has counted ``total`` calls: a call's count lands just after its
    status is sent (a shed task is counted once grpcio's task for it returns)."""
    deadline = time.monotonic() + 60
    while sum(served.handled().values()) < total and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(limit: int = 2, behavior: Optional[Callable[..., bytes]] = None, backlog: Optional[int] = 8192) -> Served:
        served = Served(limit, behavior or (lambda request, context: request), backlog)
        made.append(served)
        return served

    yield make
    for served in made:
        served.gate.open.set()
        served.server.stop(None).wait(30)


def _burst(served: Served, n: int, timeout: float = 120.0) -> tuple[grpc.Channel, list[Any]]:
    """One warm-up call (connected, counted OK), then the gate shuts and ``n`` calls go out."""
    channel = grpc.insecure_channel(f"127.0.0.1:{served.port}")
    call = channel.unary_unary(METHOD)
    call(b"warm", timeout=60)
    served.gate.open.clear()
    return channel, [call.future(b"x" * 100, timeout=timeout) for _ in range(n)]


@pytest.mark.e2e
def test_a_burst_past_cores_own_backlog_limit_is_shed_and_counted_never_cancelled(serve: Callable[..., Served]) -> None:
    """4,000 calls wait in core while the polling thread is held (core's default would cancel
    the ones past 3,000, unseen by the server); released, each is answered OK or shed with
    RESOURCE_EXHAUSTED and the retry-after key, and the server counts every one."""
    served = serve(limit=2)
    channel, calls = _burst(served, CORE_DEFAULT_HARD_LIMIT + 1000)
    with channel:
        assert served.gate.reached.wait(60)
        time.sleep(SETTLE_S)  # the burst is on the wire (a slower machine only makes the test easier to pass)
        served.gate.open.set()
        client = Counter(c.code().name for c in calls)
        assert set(client) <= {"OK", "RESOURCE_EXHAUSTED"}, client
        assert client["RESOURCE_EXHAUSTED"] > 0
        assert all(dict(c.trailing_metadata() or ()).get(RETRY_AFTER_KEY) for c in calls if c.code() != grpc.StatusCode.OK)
    settle(served, len(calls) + 1)
    handled = served.handled()
    assert handled == {"OK": client["OK"] + 1, "ResourceExhausted": client["RESOURCE_EXHAUSTED"]}  # + the warm-up call
    assert served.started() == len(calls) + 1


@pytest.mark.e2e
def test_without_the_raised_backlog_core_cancels_calls_the_server_never_sees(serve: Callable[..., Served]) -> None:
    """What the raised backlog is for, shown with grpc's own limits: the same burst, held the
    same way, comes back partly CANCELLED, and those calls are in no server count."""
    served = serve(limit=2, backlog=None)
    channel, calls = _burst(served, CORE_DEFAULT_HARD_LIMIT + 1000)
    with channel:
        assert served.gate.reached.wait(60)
        time.sleep(SETTLE_S)
        served.gate.open.set()
        client = Counter(c.code().name for c in calls)
    if client["CANCELLED"] == 0:
        pytest.skip(f"the burst did not fill core's backlog on this machine within {SETTLE_S} s: {client}")
    settle(served, len(calls) + 1 - client["CANCELLED"])
    assert served.started() == len(calls) + 1 - client["CANCELLED"]  # never seen by the server


def test_calls_whose_deadline_passed_while_queued_are_counted_not_run(serve: Callable[..., Served]) -> None:
    """Calls with a 0.5 s deadline wait in core past it: the client gets DEADLINE_EXCEEDED, no
    handler runs, and the server counts each as DEADLINE_EXCEEDED or CANCELLED (the client's
    clock may pass the deadline first and cancel the stream)."""
    ran: list[int] = []
    served = serve(limit=4, behavior=lambda request, context: ran.append(1) or request)
    channel, calls = _burst(served, 50, timeout=0.5)
    with channel:
        assert served.gate.reached.wait(60)
        client = Counter(c.code().name for c in calls)  # all expire while the gate is shut
        assert client == {"DEADLINE_EXCEEDED": 50}
        served.gate.open.set()
        shed = 0
        while True:  # behind every queued call on the one polling thread; shed while they hold the pool
            try:
                channel.unary_unary(METHOD)(b"after", timeout=60)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and shed < 1000, exc
                shed += 1
                time.sleep(0.01)
    settle(served, 52 + shed)
    handled = served.handled()
    assert handled.pop("OK") == 2 and len(ran) == 2  # warm-up and the last call: the 50 never ran
    assert handled.pop("ResourceExhausted", 0) == shed
    assert set(handled) <= {"DeadlineExceeded", "Canceled"} and sum(handled.values()) == 50, handled


def test_a_call_whose_client_leaves_while_it_runs_is_counted_cancelled(serve: Callable[..., Served]) -> None:
    inside = threading.Event()

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        inside.set()
        deadline = time.monotonic() + 60
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        return request

    served = serve(behavior=slow)
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        future = channel.unary_unary(METHOD).future(b"x", timeout=120)
        assert inside.wait(60)
        future.cancel()
        assert future.cancelled()
    settle(served, 1)
    assert served.handled() == {"Canceled": 1}
