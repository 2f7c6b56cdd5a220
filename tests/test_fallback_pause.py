"""A fallback mode does not ask a silent regulator at every step.

Against a port that refuses connections a call spends its whole deadline on gRPC's reconnect
retries, so a neutral-mode job whose regulator is down used to lose ``call_timeout`` at every
step. After a call without an answer the delivery pauses (0.5 s, doubling to 5 s) and the steps
in between fall back at once. Real refused gRPC calls; the pause's clock is the test's, so
nothing depends on speed.
"""

from __future__ import annotations

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client.delivery import QUIET_S, Delivery
from regulator_client.transport import GrpcTransport

from .conftest import RecordingTransport
from .test_client_env import dead_port


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def report(step: int) -> pb.ReportRequest:
    return pb.ReportRequest(job_id="paused", attempt=0, epoch=0, step=step)


def test_a_refused_call_pauses_the_next_tries_and_the_pause_doubles() -> None:
    clock = Clock()
    with dead_port() as (_, target):
        recorder = RecordingTransport(GrpcTransport(target, timeout=0.5))
        delivery = Delivery(recorder, mode="neutral", call_timeout=0.5, clock=clock)

        def step(n: int) -> None:
            recorder.current = n
            assert delivery.report(report(n)) is None  # refused, or paused: the step falls back
            delivery.defer_fallback(report(n), [0.0, 0.0])

        step(0)  # the first refusal starts a pause of QUIET_S[0]
        for n in range(1, 6):  # within the pause: no call at all
            step(n)
        assert [c["during"] for c in recorder.calls] == [0]
        end = delivery.end_epoch(pb.EndEpochRequest(job_id="paused", attempt=0, epoch=0))
        assert end is None and len(recorder.calls) == 1  # deferred without a call too

        clock.now += QUIET_S[0]  # the pause is over: one try (the oldest queued message), refused
        step(6)
        assert [c["during"] for c in recorder.calls] == [0, 6]
        clock.now += QUIET_S[0]  # the pause doubled: still quiet
        step(7)
        assert len(recorder.calls) == 2
        clock.now += QUIET_S[0]
        step(8)
        assert [c["during"] for c in recorder.calls] == [0, 6, 8]
        assert all(c["error"] in ("Unavailable", "DeadlineExceeded") and c["wait_for_ready"] is False for c in recorder.calls)
        assert delivery.pending == 9 + 1  # every step and the epoch end wait, in order
        assert delivery.stats.fallback_steps == 9


def test_the_longest_pause_is_bounded() -> None:
    clock = Clock()
    with dead_port() as (_, target):
        recorder = RecordingTransport(GrpcTransport(target, timeout=0.5))
        delivery = Delivery(recorder, mode="last", call_timeout=0.5, clock=clock)
        for n in range(8):
            recorder.current = n
            assert delivery.report(report(n)) is None
            delivery.defer_fallback(report(n), [0.0, 0.0])
            clock.now += QUIET_S[1]  # always past even the longest pause: every step tries
        assert [c["during"] for c in recorder.calls] == list(range(8))
