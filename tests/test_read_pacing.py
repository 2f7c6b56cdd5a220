"""Readers never starve writers, part two (issue 8, item 3): history pages are paced and their
concurrency bounded (``read_pacing.py``); a read beyond the bound is refused at once and retried
by the client, and it never holds a worker thread that a Report needs.

What the pacing buys is measured, not asserted here: ``python -m bench.history_readers``
(another job's Report p50/p90 with 4 readers of a 30,000-step session; docs/performance.md,
Readers never starve writers)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import grpc
import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from regulator_client import RegulatorClient
from regulator_client.errors import Overloaded, from_rpc_error
from regulator_client.transport import InProcessTransport
from regulator_service.wire.api import build_api
from regulator_service.client_api import RETRY_AFTER_KEY
from regulator_service.capacity.read_pacing import HISTORY_BUSY, HistoryBusy, ReadPacer
from regulator_service.edge.server import RegulatorServer, ServerConfig

from .conftest import roomy_limits, wait_until

MiB = 1 << 20


def test_the_bucket_lets_a_burst_through_and_then_charges_bytes_over_rate() -> None:
    now = [100.0]
    pacer = ReadPacer(rate=10 * MiB, max_readers=0, burst=4 * MiB, clock=lambda: now[0])
    assert pacer.delay(4 * MiB) == 0.0  # the burst: a small history is read at once
    assert pacer.delay(1 * MiB) == pytest.approx(0.1)  # then each byte costs 1/rate
    assert pacer.delay(2 * MiB) == pytest.approx(0.3)  # queued behind the previous page
    now[0] += 0.3  # the time paid for has passed: no debt, no credit yet
    assert pacer.delay(1 * MiB) == pytest.approx(0.1)
    now[0] += 60.0  # a long idle refills the bucket, but only up to the burst
    assert pacer.delay(4 * MiB) == 0.0
    assert pacer.delay(1 * MiB) == pytest.approx(0.1)
    assert ReadPacer(rate=0, max_readers=0).delay(1 << 40) == 0.0  # 0 = unpaced


def test_slots_are_bounded_and_freed_also_by_an_error() -> None:
    pacer = ReadPacer(rate=0, max_readers=2)
    with pacer.slot(), pacer.slot():
        assert pacer.active == 2
        with pytest.raises(HistoryBusy, match=f"^{HISTORY_BUSY}") as refused:
            with pacer.slot():
                pass
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(RuntimeError):
        with pacer.slot():
            raise RuntimeError("a failed page")
    assert pacer.active == 0
    with pytest.raises(ValueError):
        ReadPacer(rate=-1, max_readers=1)


def test_a_read_beyond_the_bound_is_refused_at_once_retried_and_never_blocks_reports(tmp_path: Path) -> None:
    """One slot, held by a first reader whose page waits (its pacing sleep is a gate the test
    opens): a second raw GetSession is RESOURCE_EXHAUSTED at once, a RegulatorClient retries
    it as a shed call, another job's Reports go on meanwhile, and once the gate opens every
    reader gets the whole history."""
    limits = roomy_limits(max_history_readers=1)
    with RegulatorServer(ServerConfig(port=0, state_dir=tmp_path / "state", limits=limits)) as srv:
        with RegulatorClient.connect(srv.target, timeout=60) as client:
            client.open_session("long", ["a", "b"], "official")
            client.open_session("busy", ["a", "b"], "official")
            for step in range(50):
                client.report("long", attempt=0, epoch=0, step=step, count=8, score_sums={"a": 4.0, "b": 2.0}, fisher={"a": 0.1, "b": 0.2})
            gate = threading.Event()
            srv.api.read_pacer = ReadPacer(rate=1, max_readers=1, burst=0, sleep=lambda _s: gate.wait())
            pacer = srv.api.read_pacer
            with grpc.insecure_channel(srv.target) as channel:
                stub = pb_grpc.RegulatorStub(channel)
                first = stub.GetSession.future(pb.GetSessionRequest(job_id="long", include_steps=True), timeout=60)
                wait_until(lambda: pacer.active == 1, "the first read holds the slot")
                with pytest.raises(grpc.RpcError) as refused:
                    stub.GetSession(pb.GetSessionRequest(job_id="long", include_steps=True), timeout=60)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                # "retry later" travels as a trailing-metadata key, not as message text
                assert dict(refused.value.trailing_metadata())[RETRY_AFTER_KEY] == "50"
                assert isinstance(from_rpc_error(refused.value), Overloaded)
                # a session's header is not a paged read: never refused
                assert stub.GetSession(pb.GetSessionRequest(job_id="long"), timeout=60).session.steps == 50

                retried: list[list[int]] = []
                with RegulatorClient.connect(srv.target, timeout=60) as reader:
                    t = threading.Thread(target=lambda: retried.append([s.step for s in reader.steps("long")]))
                    t.start()
                    wait_until(lambda: reader.transport.shed_retries >= 1, "the client retries the refused read")
                    for step in range(20):  # Reports do not wait for the readers
                        client.report("busy", attempt=0, epoch=0, step=step, count=8, score_sums={"a": 4.0, "b": 2.0}, fisher={"a": 0.1, "b": 0.2})
                    assert not first.done() and t.is_alive()
                    gate.set()
                    t.join(timeout=60)
                assert [s.step for s in first.result().steps] == list(range(50))
                assert retried == [list(range(50))]
                assert pacer.active == 0


def test_in_process_a_busy_history_read_is_overloaded_and_retried_as_over_grpc() -> None:
    """The in-process transport gives the same error and retries as the gRPC one: a page
    refused for want of a read slot is ``Overloaded``, retried until a slot frees, and after
    ``shed_wait_s`` reaches the caller."""
    api = build_api(limits=roomy_limits(max_history_readers=1))
    client = RegulatorClient(InProcessTransport(api, shed_wait_s=0.2))
    client.open_session("long", ["a", "b"], "official")
    for step in range(5):
        client.report("long", attempt=0, epoch=0, step=step, count=8, score_sums={"a": 4.0, "b": 2.0}, fisher={"a": 0.1, "b": 0.2})
    with api.read_pacer.slot():  # another reader holds the only slot throughout
        with pytest.raises(Overloaded, match=HISTORY_BUSY):
            list(client.steps("long"))

    patient = RegulatorClient(InProcessTransport(api, shed_wait_s=60))
    read: list[list[int]] = []
    t = threading.Thread(target=lambda: read.append([s.step for s in patient.steps("long")]))
    with contextlib.ExitStack() as held:
        held.enter_context(api.read_pacer.slot())
        t.start()
        wait_until(lambda: patient.transport.shed_retries >= 1, "the in-process read is retried")
    t.join(timeout=60)
    assert read == [list(range(5))]
    with pytest.raises(ValueError, match="shed_wait_s"):
        InProcessTransport(api, shed_wait_s=0)


def test_serve_flags_and_their_defaults() -> None:
    from regulator_cli.main import build_parser
    from regulator_service.serve import config_from_args

    def limits(*argv: str):  # type: ignore[no-untyped-def]
        return config_from_args(build_parser().parse_args(["serve", *argv]), env={}).limits

    assert (limits().history_read_rate, limits().max_history_readers) == (32 * MiB, 2)
    off = limits("--history-read-rate", "0", "--max-history-readers", "0")
    assert (off.history_read_rate, off.max_history_readers) == (0, 0)  # unpaced, unbounded
    assert limits("--history-read-rate", "8Mi").history_read_rate == 8 * MiB
