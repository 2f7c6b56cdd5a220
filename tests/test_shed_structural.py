""""Retry later" is structural (issue 21): the client retries a RESOURCE_EXHAUSTED only when the
status carries the ``inforeg-retry-after-ms`` trailing metadata, never by its message text.

The regulator admits calls itself (``regulator_service/edge/admission.py``), so a call shed at
``--max-concurrent-rpcs`` carries the key like a history read refused for want of a read slot;
a quota (the memory budget refusing a new session) and grpcio's own RESOURCE_EXHAUSTED (a request
over the size limit) do not, and are never retried.
"""

from __future__ import annotations

import ast
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from regulator_client import RegulatorClient
from regulator_client.errors import Overloaded, ResourceExhausted, retry_after_ms
from regulator_client.transport import GrpcTransport
from regulator_service.edge.server import RegulatorServer, ServerConfig

from .conftest import ROOT, roomy_limits, wait_until

TEXT_ATTRS = {"details", "message", "debug_error_string"}


def _text_of_status(node: ast.AST) -> bool:
    """``x.details()`` / ``x.debug_error_string()`` / ``exc.message`` / a variable ``details``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in TEXT_ATTRS
    if isinstance(node, ast.Attribute):
        return node.attr in TEXT_ATTRS
    return isinstance(node, ast.Name) and node.id in TEXT_ATTRS


def test_the_client_never_decides_on_a_status_text() -> None:
    """No comparison (==, !=, in, startswith) in client/ reads a status's text. (cli/connection.py
    reads gRPC's words about a failed connection, but only to word a hint for people.)"""
    found = []
    for package in ("client",):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                tested: list[ast.AST] = []
                if isinstance(node, ast.Compare):
                    tested = [node.left, *node.comparators]
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("startswith", "endswith", "find", "index"):
                    tested = [node.func.value]
                if any(_text_of_status(sub) for t in tested for sub in ast.walk(t)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"a status's text decides something at: {found}"


def test_the_text_check_can_fail() -> None:
    bad = ast.parse('if exc.details() == "Concurrent RPC limit exceeded!": pass')
    assert any(isinstance(n, ast.Compare) and _text_of_status(n.left) for n in ast.walk(bad))


@pytest.mark.e2e
def test_a_shed_call_is_retried_and_a_memory_refusal_is_not(tmp_path: Path) -> None:
    """One admission slot, held by a call waiting on a hold file: a health check is shed with
    the key, a client's ListSessions is shed and retried until the slot frees, then answered; a
    session the memory budget refuses is a plain ResourceExhausted, without the key, not retried."""
    hold = tmp_path / "hold"
    config = ServerConfig(port=0, max_concurrent_rpcs=1, debug_hold_file=str(hold), limits=roomy_limits(memory_budget=1))
    server = RegulatorServer(config).start()
    transport = GrpcTransport(server.target, timeout=60.0)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub, health = pb_grpc.RegulatorStub(channel), health_pb2_grpc.HealthStub(channel)
            hold.touch()
            held = stub.ListSessions.future(pb.ListSessionsRequest(), timeout=120)

            def shed_health() -> bool:
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                    return False  # admitted: the held call has not taken the slot yet
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_ms(exc) is not None, exc
                    return True

            def slot_taken() -> bool:
                nonlocal held
                if held.done():  # our own probe held the slot as it arrived: it was shed; again
                    assert held.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, held
                    held = stub.ListSessions.future(pb.ListSessionsRequest(), timeout=120)
                    return False
                return shed_health()

            wait_until(slot_taken, "the held call takes the only slot")
            answers: list[Any] = []
            waiter = threading.Thread(target=lambda: answers.append(RegulatorClient(transport).list_sessions()))
            waiter.start()
            wait_until(lambda: transport.shed_retries >= 1, "the client's call is shed and retried")
            assert waiter.is_alive()  # retrying, not failed
            hold.unlink()
            waiter.join(timeout=120)
            assert held.code() == grpc.StatusCode.OK and answers == [[]]

            refusals: list[grpc.RpcError] = []

            def refused_by_memory() -> bool:
                """The memory refusal, once the worker that answered the held call has released
                the only slot (until then the call is shed, with the key)."""
                with pytest.raises(grpc.RpcError) as raw:
                    stub.OpenSession(pb.OpenSessionRequest(job_id="big", modalities=["a", "b"]), timeout=30)
                assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raw.value
                refusals.append(raw.value)
                return "memory budget" in (raw.value.details() or "")

            wait_until(refused_by_memory, "the slot is released and the memory budget refuses")
            assert retry_after_ms(refusals[-1]) is None  # a memory refusal: no key, not to be retried
    finally:
        transport.close()
        server.stop(grace=0)
    # The refusal, on a server without the one-slot admission (there, a call right after another
    # could meet the slot not yet released by the worker that answered it, and be shed once).
    with RegulatorServer(ServerConfig(port=0, limits=roomy_limits(memory_budget=1))) as server:
        transport = GrpcTransport(server.target, timeout=60.0)
        try:
            with pytest.raises(ResourceExhausted, match="memory budget") as refused:
                RegulatorClient(transport).open_session("big", ["a", "b"])
            assert not isinstance(refused.value, Overloaded) and transport.shed_retries == 0
        finally:
            transport.close()
