"""Fault tests with a real `regulator serve` process and a real SQLite file.

kill -9 and restart, SIGTERM drain, a slow server, unusable state files, stale attempts.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import grpc
import pytest
from grpc_health.v1 import health_pb2

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from regulator_client.delivery import Delivery, RegulatorUnreachable
from regulator_client.transport import GrpcTransport
from regulator_service.storage.sqlite import STATE_FILE
from trainers.digits import TrainConfig, train
from trainers.digits_data import load_split
from trainers.serverproc import ServerProcess

from .conftest import RecordingTransport, health, scrape, wait_until

pytestmark = pytest.mark.e2e

VIEWS = ("fac", "zer")


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_split(VIEWS)


def history(target: str, job: str) -> tuple[list, list]:
    with RegulatorClient.connect(target) as client:
        detail = client.get_session(job, include_steps=True)
    steps = [(r.step, r.fallback, [m.factors.proximal for m in r.modalities], [m.fisher for m in r.modalities]) for r in detail.steps]
    epochs = [(e.epoch, [m.fisher_trace for m in e.modalities], [m.window.open for m in e.modalities]) for e in detail.epochs]
    return steps, epochs


class Crasher:
    """kill -9 the server at a given step, restart it on the same port and state dir."""

    def __init__(self, server: ServerProcess, at_step: int, down_s: float) -> None:
        self.server, self.at_step, self.down_s = server, at_step, down_s
        self.restarted: Optional[ServerProcess] = None
        self.thread: Optional[threading.Thread] = None

    def __call__(self, step: int) -> None:
        if step != self.at_step:
            return
        self.server.kill()

        def restart() -> None:
            time.sleep(self.down_s)
            self.restarted = ServerProcess(self.server.state_dir, port=self.server.port).start()

        self.thread = threading.Thread(target=restart)
        self.thread.start()


def test_kill9_and_restart_in_wait_mode_gives_the_uninterrupted_trajectory(tmp_path: Path, digits: Any) -> None:
    cfg = dict(views=VIEWS, profile="official", seed=3, epochs=4, on_unavailable="wait", call_timeout=2.0, wait_timeout=60.0)
    with ServerProcess(str(tmp_path / "ref")) as ref_server:
        with RegulatorClient.connect(ref_server.target) as client:
            reference = train(TrainConfig(job_id="kill9", **cfg), client, digits)
        ref_history = history(ref_server.target, "kill9")

    server = ServerProcess(str(tmp_path / "crash")).start()
    crasher = Crasher(server, at_step=37, down_s=1.5)  # mid-epoch 1
    try:
        with RegulatorClient.connect(server.target, timeout=2.0) as client:
            t0 = time.perf_counter()
            result = train(TrainConfig(job_id="kill9", **cfg), client, digits, on_step=crasher)
            elapsed = time.perf_counter() - t0
        assert crasher.thread is not None
        crasher.thread.join()
        assert crasher.restarted is not None
        assert elapsed > 1.5  # it really waited for the restart
        assert result["fallback_steps"] == 0
        assert result["applied"] == reference["applied"]  # every per-step coefficient
        assert result["weights_digest"] == reference["weights_digest"]  # bit-identical weights
        assert history(crasher.restarted.target, "kill9") == ref_history  # traces, windows, records
    finally:
        server.kill()
        if crasher.thread is not None:  # a test that failed early must not leave the restart behind
            crasher.thread.join()
        if crasher.restarted is not None:
            assert crasher.restarted.stop() == 0


def test_kill9_in_neutral_mode_never_blocks_and_marks_unregulated_steps(tmp_path: Path, digits: Any) -> None:
    server = ServerProcess(str(tmp_path / "state")).start()
    crasher = Crasher(server, at_step=30, down_s=2.0)
    # the steps' calls carry call_timeout (0.5 s) and wait_for_ready=False (asserted below); the
    # transport's own deadline and wait_for_ready are for the job's other calls, such as the history
    # read at its end, which must wait out gRPC's reconnect backoff after the restart instead of
    # failing at once with the outage's last error (seen once on a fresh clone)
    recorder = RecordingTransport(GrpcTransport(server.target, timeout=30.0, wait_for_ready=True))

    def on_step(step: int) -> None:
        crasher(step)
        if step == 4 * 25 - 1 and crasher.thread is not None:
            # fallback steps do not wait (QUIET_S), so the job can outrun the restart: the
            # regulator is back before the job's last calls, which deliver the deferred steps
            crasher.thread.join()
        recorder.current = step + 1

    try:
        with RegulatorClient(recorder) as client:
            result = train(
                TrainConfig(job_id="neutral", views=VIEWS, profile="official", seed=1, epochs=4,
                            on_unavailable="neutral", call_timeout=0.5),
                client, digits, on_step=on_step,
            )
        crasher.thread.join()  # type: ignore[union-attr]
        # Never blocked longer than one deadline, checked structurally: every call carried the
        # 0.5 s deadline without wait_for_ready, and no step made more than one call that failed.
        assert all(c["timeout"] == 0.5 and c["wait_for_ready"] is False for c in recorder.calls)
        failed = [c["during"] for c in recorder.calls if c["error"] is not None]
        assert failed and len(failed) == len(set(failed)), failed
        assert result["fallback_steps"] > 0
        steps, epochs = history(crasher.restarted.target, "neutral")  # type: ignore[union-attr]
        assert [s[0] for s in steps] == list(range(4 * 25))  # nothing lost: deferred reports arrived
        marked = [s for s in steps if s[1] == pb.FALLBACK_NEUTRAL]
        assert len(marked) == result["fallback_steps"]
        assert all(coefs == [0.0, 0.0] for _, _, coefs, _ in marked)
        applied = result["applied"]
        assert [s[2] for s in steps] == applied  # the history says what was applied, step by step
        with RegulatorClient.connect(crasher.restarted.target) as client:  # type: ignore[union-attr]
            detail = client.get_session("neutral")
        assert sum(e.fallback_steps for e in detail.epochs) == len(marked)
    finally:
        server.kill()
        if crasher.thread is not None:  # a test that failed early must not leave the restart behind
            crasher.thread.join()
        if crasher.restarted is not None:
            crasher.restarted.stop()


def test_a_call_the_server_cancels_is_a_transient_outage() -> None:
    """A call that reaches a regulator as it shuts down can come back CANCELLED (seen in the
    drain test below) although the client never cancels its calls: it must be ``Unavailable``,
    so that a delivery mode falls back or waits instead of the training job failing. A real
    gRPC server on loopback whose Report answers CANCELLED stands in for the shutting-down one."""
    cancelled = grpc.unary_unary_rpc_method_handler(
        lambda request, context: context.abort(grpc.StatusCode.CANCELLED, ""),
        request_deserializer=pb.ReportRequest.FromString, response_serializer=pb.ReportResponse.SerializeToString,
    )
    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inforeg.regulator.v1.Regulator", {"Report": cancelled}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        transport = GrpcTransport(f"127.0.0.1:{port}", timeout=10)
        request = pb.ReportRequest(job_id="j", count=8)
        with pytest.raises(Unavailable, match="cancelled the call"):
            transport.report(request)
        assert Delivery(transport, mode="neutral").report(request) is None  # the step falls back
        with pytest.raises(RegulatorUnreachable):  # wait mode waits it out, then says so
            Delivery(transport, mode="wait", call_timeout=1.0, wait_timeout=0.5).report(request)
        transport.close()
    finally:
        server.stop(0)


def test_sigterm_drains_in_flight_calls_and_flushes_state(tmp_path: Path) -> None:
    server = ServerProcess(str(tmp_path / "state"), extra_args=["--debug-delay", "0.8", "--grace", "5"]).start()
    jobs = [f"drain-{i}" for i in range(4)]
    with RegulatorClient.connect(server.target, timeout=10) as client:
        for job in jobs:
            client.open_session(job, ["a", "b"], "official")

        def report(job: str) -> Any:
            return client.report(job, attempt=0, epoch=0, step=0, count=8,
                                 score_sums={"a": 4.0, "b": 2.0}, fisher={"a": 0.1, "b": 0.2})

        def reports_started() -> bool:
            # one stream per job, each holding its first Report (the server delays every message 0.8 s)
            return 'grpc_server_msg_received_total{grpc_method="ReportStream",grpc_service="inforeg.regulator.v1.Regulator",grpc_type="bidi_stream"} 4.0' in scrape(server.metrics_port)  # type: ignore[arg-type]

        def refused() -> bool:
            with RegulatorClient.connect(server.target, timeout=30) as probe:  # answered at once either way
                try:
                    probe.list_sessions()
                except Unavailable:
                    return True
            return False

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(report, job) for job in jobs]
            wait_until(reports_started, "all four reports are inside the server (each sleeping 0.8 s)")
            assert server.proc is not None
            server.proc.send_signal(15)
            wait_until(refused, "the draining server refuses new calls")
            results = [f.result(timeout=30) for f in futures]
        assert all(r.step.modalities[0].factors.proximal > 0 for r in results)
        assert server.proc.wait(timeout=15) == 0
    with ServerProcess(str(tmp_path / "state")) as again:  # everything answered was made durable
        with RegulatorClient.connect(again.target) as client:
            assert [client.get_session(job).session.steps for job in jobs] == [1, 1, 1, 1]


def test_slow_server_clients_hit_deadlines_and_do_not_pile_up(tmp_path: Path, digits: Any) -> None:
    with ServerProcess(None, extra_args=["--debug-delay", "1.0", "--max-workers", "4"]) as server:
        with RegulatorClient.connect(server.target, timeout=0.2) as client:
            with pytest.raises(DeadlineExceeded):  # a plain call: its own 0.2 s deadline
                client.list_sessions()
            recorder = RecordingTransport(GrpcTransport(server.target, timeout=3.0))

            def on_step(step: int) -> None:
                recorder.current = step + 1

            # OpenSession waits for the regulator (deadline 3 s, the server takes 1 s); a step
            # then gives up after one 0.2 s deadline instead of queueing, and after a call
            # without an answer the next steps fall back at once for a pause (QUIET_S)
            result = train(
                TrainConfig(job_id="slow", views=VIEWS, profile="official", epochs=1,
                            on_unavailable="last", call_timeout=0.2, wait_timeout=10.0),
                RegulatorClient(recorder), digits, on_step=on_step,
            )
        assert result["fallback_steps"] == 25
        steps = [c for c in recorder.calls if c["method"] == "report" and c["during"] < 25]
        # at most one call per step, each with the 0.2 s deadline and no wait_for_ready: nothing queues
        during = [c["during"] for c in steps]
        assert during and during[0] == 0 and during == sorted(set(during)), during
        assert all(c["timeout"] == 0.2 and c["wait_for_ready"] is False for c in steps)
        assert all(c["error"] == "DeadlineExceeded" for c in steps)


def test_unusable_state_files_are_reported_and_left_untouched(tmp_path: Path) -> None:
    for name, damage in [("corrupt", b"definitely not sqlite" * 64), ("future", None)]:
        state = tmp_path / name
        state.mkdir()
        path = state / STATE_FILE
        if damage is None:
            with ServerProcess(str(state)):
                pass
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA user_version = 42")
            conn.close()
        else:
            path.write_bytes(damage)
        raw = path.read_bytes()
        log = tmp_path / f"{name}.log"
        with ServerProcess(str(state), log_path=str(log)) as server:
            assert health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING
            # a deadline that the client's retries of UNAVAILABLE end well within, on any machine
            with RegulatorClient.connect(server.target, timeout=30) as client:
                with pytest.raises(Unavailable, match="state store unusable"):
                    client.list_sessions()
            text = scrape(server.metrics_port)  # type: ignore[arg-type]
            assert "inforeg_regulator_state_store_healthy 0.0" in text
        assert path.read_bytes() == raw  # never overwritten
        assert "state store unusable" in log.read_text()


def test_stale_attempt_is_fenced_even_in_fallback_modes(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from regulator_client.hook import InfoRegHook

    with ServerProcess(None) as server:
        client = RegulatorClient.connect(server.target)
        enc = {"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)}
        old = InfoRegHook(client, enc, job_id="elastic", attempt=0, on_unavailable="neutral")
        old.on_epoch_start(0)
        x = torch.randn(4, 3)
        y = torch.tensor([0, 1, 0, 1])

        def step(hook: InfoRegHook) -> Any:
            for m in enc.values():
                m.zero_grad()
            logits = {k: m(x) for k, m in enc.items()}
            sum(nn.functional.cross_entropy(v, y) for v in logits.values()).backward()
            return hook.after_backward(logits=logits, labels=y)

        step(old)
        new = InfoRegHook(client, enc, job_id="elastic", attempt=1)
        new.on_epoch_start(0)
        step(new)
        with pytest.raises(FailedPrecondition, match="stale"):
            step(old)  # never mixed into attempt 1, and never silently treated as a fallback
        detail = client.get_session("elastic")
        assert detail.session.attempt == 1 and detail.session.steps == 1
        client.close()


def test_elastic_restart_resumes_with_the_inherited_history(tmp_path: Path, digits: Any) -> None:
    """Attempt 0 dies after epoch 2; attempt 1 restarts from the epoch-2 checkpoint. Its windows
    and coefficients are those of an uninterrupted run, and attempt 0 is fenced off."""
    import torch

    from regulator_client.hook import InfoRegHook
    from trainers.digits import epoch_order, loss_fn
    from trainers.digits_model import ConcatFusionNet

    def run(client: RegulatorClient, attempt: int, epochs: range, state: Any = None) -> tuple[list, Any]:
        torch.manual_seed(0)
        model = ConcatFusionNet(digits.dims)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if state is not None:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        xs = {v: torch.from_numpy(digits.x_train[v]) for v in VIEWS}
        y = torch.from_numpy(digits.y_train)
        hook = InfoRegHook(client, {v: model.encoders[v] for v in VIEWS}, job_id="elastic-dd", attempt=attempt,
                           profile="official", keep_history=True, start_epoch=epochs.start, start_step=25 * epochs.start)
        hook.open()
        for epoch in epochs:
            hook.on_epoch_start(epoch)
            order = epoch_order(len(y), 0, epoch)
            for start in range(0, len(y), 64):
                idx = order[start : start + 64]
                opt.zero_grad()
                fused, uni = model({v: xs[v][idx] for v in VIEWS})
                loss_fn(fused, uni, y[idx], False).backward()
                hook.after_backward(logits=uni, labels=y[idx])
                opt.step()
            hook.on_epoch_end()
        return [r.proximal for r in hook.history], (model.state_dict(), opt.state_dict())

    with ServerProcess(None) as server:
        client = RegulatorClient.connect(server.target)
        reference, _ = run(client, 0, range(0, 5))
        client.close_session("elastic-dd", attempt=0)
        with ServerProcess(str(tmp_path / "state")) as elastic:
            c2 = RegulatorClient.connect(elastic.target)
            first, checkpoint = run(c2, 0, range(0, 2))
            resumed, _ = run(c2, 1, range(2, 5), checkpoint)
            assert first + resumed == reference
            detail = c2.get_session("elastic-dd")
            assert detail.session.attempt == 1 and detail.session.resume_epoch == 2
            assert [e.epoch for e in detail.epochs] == [0, 1, 2, 3, 4, 5]
            with pytest.raises(FailedPrecondition, match="stale"):
                c2.report("elastic-dd", attempt=0, epoch=2, step=50, count=1, score_sums={"fac": 1.0, "zer": 1.0},
                          fisher={"fac": 1.0, "zer": 1.0})
            with pytest.raises(FailedPrecondition, match="closed only"):
                c2.open_session("elastic-dd", ["fac", "zer"], "official", attempt=2, resume_epoch=9)
