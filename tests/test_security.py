"""Who gets in and what is bounded: tokens, TLS, mTLS, Unix sockets, resource limits, TTL."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.errors import FailedPrecondition, ResourceExhausted, Unauthenticated, Unavailable
from regulator_client.transport import TlsConfig
from regulator_cli.main import build_parser
from regulator_service.wire.api import RegulatorAPI
from regulator_service.core.manager import SessionManager
from regulator_service.edge.security import TlsFiles, TokenSource
from regulator_service.serve import apply_env_defaults, config_from_args
from regulator_service.edge.server import RegulatorServer, ServerConfig

from .conftest import STORE_TIMEOUT_S, health, roomy_limits, wait_until
from .pki import make_pki
from .postgres import Stores

SERVING = health_pb2.HealthCheckResponse.SERVING

TOKEN = "s3cret-token-0123456789"


def refuses(client: RegulatorClient) -> bool:
    try:
        client.list_sessions()
    except Unauthenticated:
        return True
    return False


def test_bearer_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    # a grace period far longer than the test: "still accepted within it" cannot race the clock
    config = ServerConfig(port=0, health_port=0, token=TokenSource(path=token_file, recheck_s=0.0, grace_s=600.0))
    with RegulatorServer(config) as srv:
        with RegulatorClient.connect(srv.target, token=TOKEN) as ok:
            ok.open_session("t", ["a", "b"])
        for token in ("wrong-token-0123456789", None):
            with RegulatorClient.connect(srv.target, token=token or "") as bad:
                with pytest.raises(Unauthenticated):
                    bad.list_sessions()
        assert health(srv.target) == SERVING  # health is exempt: kubelet probes carry no token
        assert health(f"127.0.0.1:{srv.health_port}") == SERVING  # and the plaintext health port
        # a rotated Secret is picked up without a restart; the old token has a grace period
        token_file.write_text("rotated-token-abcdefghij")
        with RegulatorClient.connect(srv.target, token="rotated-token-abcdefghij") as rotated:
            assert [s.job_id for s in rotated.list_sessions()] == ["t"]
        with RegulatorClient.connect(srv.target, token=TOKEN) as stale:
            assert not refuses(stale)  # within the grace period
    # ... which ends: a short one, polled for (how soon the refusal is seen depends on the machine)
    short = tmp_path / "short-grace"
    short.write_text(TOKEN)
    with RegulatorServer(ServerConfig(port=0, token=TokenSource(path=short, recheck_s=0.0, grace_s=0.2))) as srv:
        with RegulatorClient.connect(srv.target, token=TOKEN) as stale:
            assert not refuses(stale)
            short.write_text("rotated-token-abcdefghij")
            with RegulatorClient.connect(srv.target, token="rotated-token-abcdefghij") as rotated:
                rotated.list_sessions()  # the server reads the new file
            wait_until(lambda: refuses(stale), "the old token is refused once its grace period is over")


def test_client_rereads_a_rotated_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server_file, client_file = tmp_path / "server-token", tmp_path / "client-token"
    server_file.write_text(TOKEN)
    client_file.write_text(TOKEN)
    monkeypatch.setenv("REGULATOR_TOKEN_FILE", str(client_file))
    with RegulatorServer(ServerConfig(port=0, token=TokenSource(path=server_file, recheck_s=0.0, grace_s=0.0))) as srv:
        with RegulatorClient.connect(srv.target) as client:  # one long-lived client, as a training job
            client.open_session("rotating", ["a", "b"])
            server_file.write_text("second-token-abcdefghij")
            client_file.write_text("second-token-abcdefghij")
            time.sleep(5.1)  # the client re-reads its file at most every 5 s
            assert client.get_session("rotating").session.job_id == "rotating"


def test_token_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGULATOR_TOKEN", TOKEN)
    args = build_parser().parse_args(["serve", "--port", "0", "--metrics-port", "-1", "--in-memory"])
    with RegulatorServer(config_from_args(args)) as srv:
        with RegulatorClient.connect(srv.target) as client:  # the client reads REGULATOR_TOKEN too
            client.list_sessions()
        monkeypatch.delenv("REGULATOR_TOKEN")
        monkeypatch.setenv("REGULATOR_TOKEN_FILE", str(tmp_path / "t"))
        (tmp_path / "t").write_text("not-the-token-xxxxxxxx")
        with RegulatorClient.connect(srv.target) as client:
            with pytest.raises(Unauthenticated):
                client.list_sessions()


def test_short_token_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        TokenSource(token="short")


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with RegulatorServer(ServerConfig(port=0, tls=TlsFiles(pki.server_cert, pki.server_key))) as srv:
        target = f"localhost:{srv.port}"
        with RegulatorClient.connect(target, tls=TlsConfig(ca=str(pki.ca))) as client:
            assert client.list_sessions() == []
        with RegulatorClient.connect(target, timeout=30) as plaintext:  # no TLS: refused (retries end long before)
            with pytest.raises(Unavailable):
                plaintext.list_sessions()
    mtls = TlsFiles(pki.server_cert, pki.server_key, client_ca=pki.ca)
    with RegulatorServer(ServerConfig(port=0, tls=mtls)) as srv:
        target = f"localhost:{srv.port}"
        with RegulatorClient.connect(target, tls=TlsConfig(str(pki.ca), str(pki.client_cert), str(pki.client_key))) as client:
            client.open_session("mtls", ["a", "b"])
        for tls in (TlsConfig(ca=str(pki.ca)), TlsConfig(str(pki.ca), str(pki.rogue_cert), str(pki.rogue_key))):
            with RegulatorClient.connect(target, tls=tls, timeout=30) as refused:
                with pytest.raises(Unavailable):
                    refused.list_sessions()


def test_unix_domain_socket(tmp_path: Path) -> None:
    sock = tmp_path / "regulator.sock"
    with RegulatorServer(ServerConfig(port=0, uds=str(sock))):
        with RegulatorClient.connect(f"unix:{sock}") as client:
            client.open_session("uds", ["a", "b"])
            assert client.get_session("uds").session.job_id == "uds"


def test_resource_bounds(tmp_path: Path) -> None:
    limits = roomy_limits(max_open_sessions=3, max_modalities=4)
    with RegulatorServer(ServerConfig(port=0, state_dir=tmp_path, limits=limits, max_receive_bytes=64 * 1024)) as srv:
        with RegulatorClient.connect(srv.target) as client:
            for i in range(3):
                client.open_session(f"j{i}", ["a", "b"])
            with pytest.raises(ResourceExhausted, match="limit is 3"):
                client.open_session("j3", ["a", "b"])
            client.close_session("j0", attempt=0)  # a closed session frees its slot
            client.open_session("j3", ["a", "b"])
            with pytest.raises(ResourceExhausted, match="limit of 4"):
                client.open_session("wide", [f"m{i}" for i in range(5)])
            with pytest.raises(ResourceExhausted):  # larger than --max-message-bytes
                client.open_session("x" * 10, ["a", "b" * 100_000])
            assert client.get_session("j0").session.state == pb.SESSION_STATE_CLOSED


def test_idle_sessions_expire_and_the_expiry_is_persisted(tmp_path: Path) -> None:
    """A real server's sweeper expires an idle session (polled for: the sweep runs every
    TTL/4); the expiry is stored and survives a restart."""
    with RegulatorServer(ServerConfig(port=0, state_dir=tmp_path, limits=roomy_limits(session_ttl_s=0.3))) as srv:
        with RegulatorClient.connect(srv.target) as client:
            client.open_session("idle", ["a", "b"])
            wait_until(lambda: client.get_session("idle").session.state == pb.SESSION_STATE_EXPIRED, "the idle session expired")
            with pytest.raises(FailedPrecondition, match="expired"):
                client.report("idle", attempt=0, epoch=0, step=0, count=2, score_sums={"a": 1.0, "b": 1.0}, fisher={"a": 1.0, "b": 1.0})
    with RegulatorServer(ServerConfig(port=0, state_dir=tmp_path, limits=roomy_limits())) as srv:  # after a restart
        with RegulatorClient.connect(srv.target) as client:
            assert client.get_session("idle").session.state == pb.SESSION_STATE_EXPIRED
            assert client.list_sessions() == []


def test_only_idleness_expires_a_session(stores: Stores) -> None:
    """Which sessions expire is a question of the session's clock, not of this machine's speed:
    a job that reports every 4 s of a 10 s TTL stays open, one silent for 12 s expires
    (the manager's clock is the test's; every store)."""
    now = [1_000.0]
    store = stores.open() if stores.backend == "memory" else stores.open(timeout_s=STORE_TIMEOUT_S)
    manager = SessionManager(store, limits=roomy_limits(session_ttl_s=10.0), clock=lambda: now[0])
    manager.restore()
    client = RegulatorClient.in_process(RegulatorAPI(manager))
    client.open_session("idle", ["a", "b"])
    client.open_session("busy", ["a", "b"])
    for step in range(6):
        now[0] += 4.0
        client.report("busy", attempt=0, epoch=0, step=step, count=2, score_sums={"a": 1.0, "b": 1.0}, fisher={"a": 1.0, "b": 1.0})
        expired = manager.expire_idle()
        assert [k.job_id for k in expired] == (["idle"] if step == 2 else [])  # idle for 12 s at step 2
    assert client.get_session("idle").session.state == pb.SESSION_STATE_EXPIRED
    assert client.get_session("busy").session.state == pb.SESSION_STATE_OPEN
    store.close()


def test_every_serve_flag_has_an_environment_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGULATOR_PORT", "0")
    monkeypatch.setenv("REGULATOR_STATE_DIR", "/tmp/elsewhere")
    monkeypatch.setenv("REGULATOR_IN_MEMORY", "true")
    monkeypatch.setenv("REGULATOR_SESSION_TTL", "60")
    args = build_parser().parse_args(["serve", "--metrics-port", "-1"])
    assert (args.port, args.state_dir, args.in_memory, args.session_ttl, args.metrics_port) == (0, "/tmp/elsewhere", True, 60.0, -1)
    monkeypatch.setenv("REGULATOR_PORT", "many")
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=1)
    with pytest.raises(SystemExit):
        apply_env_defaults(parser)
