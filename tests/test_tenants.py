"""Tenants (`serve --tenants FILE`): each team's identity (bearer token or mTLS SAN) reaches only
its own jobs, over a real server on loopback; the file reloads, and a broken one keeps the last."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import generate_latest

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from regulator_client import RegulatorClient
from regulator_client.errors import RegulatorError, Unauthenticated
from regulator_client.transport import TlsConfig
from regulator_cli.main import build_parser
from regulator_service.edge import tenant_access
from regulator_service.edge.security import TlsFiles
from regulator_service.edge.server import RegulatorServer, ServerConfig
from regulator_service.edge.tenants import CONFLICT, INVALID_TOKEN, Tenant, Tenants, TenantsFileError, load_tenants
from regulator_service.serve import config_from_args

from .conftest import metric, roomy_limits, scrape
from .serving import serving

VISION_TOKEN, AUDIO_TOKEN = "vision-token-0123456789", "audio-token-0123456789"
VISION_SAN = "spiffe://cluster.local/ns/vision/sa/trainer"
AUDIO_SAN = "trainer.audio.svc.cluster.local"  # a DNS SAN
STATS = {"a": 0.5, "b": 0.25}
FISHER = {"a": 1.0, "b": 2.0}


def write_tenants(path: Path, *entries: str) -> Path:
    path.write_text("tenants:\n" + "".join(entries))
    return path


def entry(name: str, prefix: str, token_file: Optional[str] = None, san: Optional[str] = None) -> str:
    lines = f"  - name: {name}\n    job_prefix: \"{prefix}\"\n"
    if token_file:
        lines += f"    token_file: {token_file}\n"
    if san:
        lines += f"    client_cert_san: {san}\n"
    return lines


@pytest.fixture
def two_teams(tmp_path: Path) -> Path:
    (tmp_path / "vision.token").write_text(VISION_TOKEN + "\n")
    (tmp_path / "audio.token").write_text(AUDIO_TOKEN)
    return write_tenants(
        tmp_path / "tenants.yaml",
        entry("vision", "vision/", "vision.token", VISION_SAN),
        entry("audio", "audio/", "audio.token", AUDIO_SAN),
    )


# -- the file ------------------------------------------------------------------------------------


def test_a_good_file_loads(two_teams: Path) -> None:
    table = load_tenants(two_teams)
    assert [(t.name, t.job_prefix, t.sans) for t in table.tenants] == [
        ("vision", "vision/", (VISION_SAN,)), ("audio", "audio/", (AUDIO_SAN,))
    ]
    assert table.files == (two_teams, two_teams.parent / "vision.token", two_teams.parent / "audio.token")


BROKEN = {
    "not YAML": ("tenants: [\n", "not valid YAML"),
    "no list": ("tenants: {}\n", "a non-empty list"),
    "other key": ("tenant:\n" + entry("vision", "vision/", "vision.token"), "one key, 'tenants'"),
    "unknown field": ("tenants:\n" + entry("vision", "vision/", "vision.token") + "    prefix: x\n", "unknown key(s) ['prefix']"),
    "bad name": ("tenants:\n" + entry("Vision Team", "vision/", "vision.token"), "name must be"),
    "bad prefix": ("tenants:\n" + entry("vision", "/vision", "vision.token"), "job_prefix must start a job id"),
    "no identity": ("tenants:\n" + entry("vision", "vision/"), "give token_file, client_cert_san or both"),
    "missing token file": ("tenants:\n" + entry("vision", "vision/", "gone.token"), "cannot read token file"),
    "short token": ("tenants:\n" + entry("vision", "vision/", "short.token"), "at least 16 characters"),
    "same name": ("tenants:\n" + entry("vision", "vision/", "vision.token") + entry("vision", "v2/", "audio.token"), "named twice"),
    "same token": ("tenants:\n" + entry("vision", "vision/", "vision.token") + entry("audio", "audio/", "vision.copy"), "holds the token of tenant 'vision'"),
    "same SAN": ("tenants:\n" + entry("vision", "vision/", san=VISION_SAN) + entry("audio", "audio/", san=VISION_SAN), "identifies tenant 'vision' already"),
    "nested prefixes": ("tenants:\n" + entry("vision", "vision/", "vision.token") + entry("sub", "vision/sub/", "audio.token"), "overlaps tenant 'vision'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_file_is_one_clear_error(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    (tmp_path / "vision.token").write_text(VISION_TOKEN)
    (tmp_path / "vision.copy").write_text(VISION_TOKEN + "\n")
    (tmp_path / "audio.token").write_text(AUDIO_TOKEN)
    (tmp_path / "short.token").write_text("short")
    (tmp_path / "tenants.yaml").write_text(text)
    with pytest.raises(TenantsFileError) as err:
        load_tenants(tmp_path / "tenants.yaml")
    message = str(err.value)
    assert expected in message and str(tmp_path / "tenants.yaml") in message and "\n" not in message, message
    assert VISION_TOKEN not in message and AUDIO_TOKEN not in message, "a token is never shown"


def test_every_regulator_method_has_a_scope() -> None:
    """A new RPC must be given a scope here, or tenants are refused it (fail closed)."""
    methods = {m.name for m in tenant_access.SERVICE.methods}
    assert methods == tenant_access.JOB_ADDRESSED | tenant_access.LISTING
    for name in tenant_access.JOB_ADDRESSED:
        request = getattr(pb, tenant_access.SERVICE.methods_by_name[name].input_type.name)
        assert "job_id" in request.DESCRIPTOR.fields_by_name, name


def test_a_listing_keeps_the_tenants_sessions_and_its_newest_inactive_ones() -> None:
    info = lambda job, state, active: pb.SessionInfo(job_id=job, state=state, last_active_unix_ms=active)  # noqa: E731
    listing = pb.ListSessionsResponse(sessions=[
        info("audio/a", pb.SESSION_STATE_CLOSED, 9), info("vision/a", pb.SESSION_STATE_CLOSED, 1),
        info("vision/b", pb.SESSION_STATE_OPEN, 2), info("vision/c", pb.SESSION_STATE_EXPIRED, 3),
        info("vision/d", pb.SESSION_STATE_CORRUPT, 0), info("vision/e", pb.SESSION_STATE_SUPERSEDED, 5),
    ])
    vision = Tenant("vision", "vision/", sans=(VISION_SAN,))
    jobs = lambda limit: [s.job_id for s in tenant_access.tenants_listing(listing, vision, limit).sessions]  # noqa: E731
    assert jobs(0) == ["vision/a", "vision/b", "vision/c", "vision/d", "vision/e"]
    assert jobs(2) == ["vision/b", "vision/c", "vision/d", "vision/e"]  # open and quarantined ones always


def serve_config(*argv: str, env: Optional[dict[str, str]] = None) -> ServerConfig:
    args = build_parser().parse_args(["serve", "--port", "0", "--metrics-port", "-1", "--in-memory", *argv])
    return config_from_args(args, env={} if env is None else env)


def test_serve_flag_and_its_mistakes(two_teams: Path, tmp_path: Path) -> None:
    config = serve_config("--tenants", str(two_teams), "--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca")
    assert config.tenants is not None and config.token is None
    with pytest.raises(ValueError, match="replaces the single bearer token"):
        serve_config("--tenants", str(two_teams), "--token-file", str(tmp_path / "vision.token"))
    with pytest.raises(ValueError, match="replaces the single bearer token"):
        serve_config("--tenants", str(two_teams), env={"REGULATOR_TOKEN": VISION_TOKEN})
    with pytest.raises(ValueError, match=r"\['vision', 'audio'\] are identified by client_cert_san, which needs mutual TLS"):
        serve_config("--tenants", str(two_teams))


@pytest.mark.e2e
def test_serve_validates_the_file_at_startup_in_one_line(tmp_path: Path) -> None:
    bad = write_tenants(tmp_path / "tenants.yaml", entry("vision", "vision/", "missing.token"))
    proc = subprocess.run(
        [sys.executable, "-m", "regulator_cli", "serve", "--port", "0", "--in-memory", "--metrics-port", "-1"],
        env={"REGULATOR_TENANTS": str(bad), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"regulator serve: tenants file {bad}: tenant 'vision': cannot read token file {tmp_path / 'missing.token'}: "
        "No such file or directory"
    ], proc.stderr


@pytest.mark.e2e
def test_serve_with_tenants_from_the_environment(two_teams: Path, tmp_path: Path) -> None:
    """`regulator serve` with REGULATOR_TENANTS: the startup line names the tenants; each token
    reaches its own jobs only."""
    tokens_only = write_tenants(tmp_path / "tokens.yaml", entry("vision", "vision/", "vision.token"), entry("audio", "audio/", "audio.token"))
    with serving(tmp_path, "--metrics-port", "-1", env={"REGULATOR_TENANTS": str(tokens_only), "REGULATOR_TOKEN": ""}) as srv:
        assert "tenants ['vision', 'audio']" in srv.output()
        with RegulatorClient.connect(srv.target, token=AUDIO_TOKEN) as audio:
            audio.open_session("audio/a", ["a", "b"])
            assert code_and_message(lambda: audio.open_session("vision/a", ["a", "b"]))[0] == grpc.StatusCode.PERMISSION_DENIED
        with RegulatorClient.connect(srv.target, token=VISION_TOKEN) as vision:
            assert vision.list_sessions() == []


# -- isolation -----------------------------------------------------------------------------------


def code_and_message(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(RegulatorError) as err:
        call()
    return err.value.code, str(err.value)


def job_calls(client: RegulatorClient, job: str, snapshot: pb.SessionSnapshot) -> dict[str, Callable[[], Any]]:
    """Every job-addressed RPC on ``job`` (attempt 0)."""
    return {
        "open": lambda: client.open_session(job, ["a", "b"]),
        "open with snapshot": lambda: client.send(
            pb.OpenSessionRequest(job_id=job, modalities=["a", "b"], resume_epoch=1, next_attempt=True, snapshot=snapshot)
        ),
        "report": lambda: client.report(job, attempt=0, epoch=1, step=9, count=4, score_sums=STATS, fisher=FISHER),
        "end epoch": lambda: client.end_epoch(job, attempt=0, epoch=1),
        "read": lambda: client.get_session(job),
        "read steps": lambda: client.get_session(job, include_steps=True),
        "close": lambda: client.close_session(job, attempt=0),
    }


def run_a_job(client: RegulatorClient, job: str) -> pb.SessionSnapshot:
    """Opens ``job``, reports a step, closes epoch 0; the snapshot a checkpoint would hold."""
    client.open_session(job, ["a", "b"])
    client.report(job, attempt=0, epoch=0, step=0, count=4, score_sums=STATS, fisher=FISHER)
    closed = client.end_epoch(job, attempt=0, epoch=0).closed
    info = client.get_session(job).session
    return pb.SessionSnapshot(modalities=info.modalities, profile=info.profile, epochs=[closed])


def assert_isolated(own: RegulatorClient, other: RegulatorClient, own_job: str, other_prefix: str) -> None:
    """``own`` runs a job; ``other`` (another tenant) can do nothing to it and learns nothing
    about whether it exists; each lists only its jobs."""
    snapshot = run_a_job(own, own_job)
    other_job = other_prefix + "mine"
    other.open_session(other_job, ["a", "b"])
    existing = job_calls(other, own_job, snapshot)
    missing = job_calls(other, own_job.rsplit("/", 1)[0] + "/no-such-job", snapshot)
    for name in existing:
        seen = code_and_message(existing[name])
        assert seen[0] == grpc.StatusCode.PERMISSION_DENIED, (name, seen)
        assert seen == code_and_message(missing[name]), f"{name}: the answer tells whether the job exists"
    assert [s.job_id for s in own.list_sessions()] == [own_job]
    assert [s.job_id for s in other.list_sessions(include_inactive=True)] == [other_job]
    # the job is untouched and goes on
    assert own.get_session(own_job).session.steps == 1
    own.report(own_job, attempt=0, epoch=1, step=1, count=4, score_sums=STATS, fisher=FISHER)
    own.close_session(own_job, attempt=0)
    assert [(s.job_id, s.state) for s in own.list_sessions(include_inactive=True)] == [(own_job, pb.SESSION_STATE_CLOSED)]
    assert [s.job_id for s in other.list_sessions(include_inactive=True)] == [other_job]


@pytest.fixture
def tenant_server(two_teams: Path) -> Iterator[RegulatorServer]:
    config = ServerConfig(port=0, limits=roomy_limits(), tenants=Tenants(two_teams, recheck_s=0.0))
    with RegulatorServer(config) as srv:
        yield srv


@pytest.mark.e2e
def test_isolation_over_bearer_tokens(tenant_server: RegulatorServer) -> None:
    target = tenant_server.target
    with RegulatorClient.connect(target, token=VISION_TOKEN) as vision, RegulatorClient.connect(target, token=AUDIO_TOKEN) as audio:
        assert_isolated(vision, audio, "vision/resnet", "audio/")
    for token in ("unknown-token-0123456789", ""):
        with RegulatorClient.connect(target, token=token) as stranger:
            with pytest.raises(Unauthenticated):
                stranger.list_sessions()
            with pytest.raises(Unauthenticated):
                stranger.get_session("vision/resnet")
    # the body of a call is parsed only once its caller is identified
    with grpc.insecure_channel(target) as channel:
        report = channel.unary_unary("/inforeg.regulator.v1.Regulator/Report")
        for token, code in ((VISION_TOKEN, grpc.StatusCode.INVALID_ARGUMENT), ("unknown-token-0123456789", grpc.StatusCode.UNAUTHENTICATED)):
            with pytest.raises(grpc.RpcError) as err:
                report(b"\xff\xff\xff", metadata=(("authorization", f"Bearer {token}"),), timeout=30)
            assert err.value.code() == code, err.value
    registry = generate_latest(tenant_server.registry).decode()
    assert "vision/resnet" not in registry.split("inforeg_regulator_tenant")[1], "no job id in a tenant series"


# -- mTLS identities -----------------------------------------------------------------------------


def _cert(path: Path, subject: str, key: ec.EllipticCurvePrivateKey, issuer: Optional[x509.Certificate],
          issuer_key: ec.EllipticCurvePrivateKey, sans: list[x509.GeneralName], usage: Optional[x509.ObjectIdentifier]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert


def make_team_pki(d: Path) -> None:
    """ca.pem; server.pem (localhost); clients vision.pem (URI SAN), audio.pem (DNS SAN),
    stranger.pem (a SAN no tenant has), all signed by the CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(d / "ca.pem", "tenants-test-ca", ca_key, None, ca_key, [], None)
    _cert(d / "server.pem", "server", ec.generate_private_key(ec.SECP256R1()), ca, ca_key,
          [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], ExtendedKeyUsageOID.SERVER_AUTH)
    for name, san in (("vision", x509.UniformResourceIdentifier(VISION_SAN)), ("audio", x509.DNSName(AUDIO_SAN)),
                      ("stranger", x509.UniformResourceIdentifier("spiffe://cluster.local/ns/other/sa/trainer"))):
        _cert(d / f"{name}.pem", name, ec.generate_private_key(ec.SECP256R1()), ca, ca_key, [san], ExtendedKeyUsageOID.CLIENT_AUTH)


def tls_as(d: Path, who: str) -> TlsConfig:
    return TlsConfig(str(d / "ca.pem"), str(d / f"{who}.pem"), str(d / f"{who}.key"))


def mtls_server_config(tenants: Path, tmp_path: Path) -> tuple[Path, ServerConfig]:
    """The teams' PKI under ``tmp_path/pki`` and a server that requires their client certificates."""
    pki = tmp_path / "pki"
    pki.mkdir()
    make_team_pki(pki)
    tls = TlsFiles(pki / "server.pem", pki / "server.key", client_ca=pki / "ca.pem")
    return pki, ServerConfig(port=0, limits=roomy_limits(), tls=tls, tenants=Tenants(tenants, recheck_s=0.0))


@pytest.mark.e2e
def test_isolation_over_mtls_identities(two_teams: Path, tmp_path: Path) -> None:
    pki, config = mtls_server_config(two_teams, tmp_path)
    with RegulatorServer(config) as srv:
        target = f"localhost:{srv.port}"
        with RegulatorClient.connect(target, tls=tls_as(pki, "vision"), token="") as vision, \
                RegulatorClient.connect(target, tls=tls_as(pki, "audio"), token="") as audio:
            assert_isolated(audio, vision, "audio/wav2vec", "vision/")
        with RegulatorClient.connect(target, tls=tls_as(pki, "stranger"), token="") as stranger:
            with pytest.raises(Unauthenticated, match="no tenant is identified by this client certificate"):
                stranger.list_sessions()
        # a certificate and a token of different tenants: refused, not resolved either way
        with RegulatorClient.connect(target, tls=tls_as(pki, "vision"), token=AUDIO_TOKEN) as mixed:
            with pytest.raises(Unauthenticated, match="different tenants"):
                mixed.list_sessions()
        with RegulatorClient.connect(target, tls=tls_as(pki, "stranger"), token=AUDIO_TOKEN) as audio_by_token:
            assert [s.job_id for s in audio_by_token.list_sessions(include_inactive=True)] == ["audio/wav2vec"]


# -- Report streams ------------------------------------------------------------------------------


def stream_report(job: str, step: int, epoch: int = 1) -> pb.ReportRequest:
    stats = [pb.ModalityStats(modality=m, score_sum=STATS[m], fisher=FISHER[m]) for m in ("a", "b")]
    return pb.ReportRequest(job_id=job, attempt=0, epoch=epoch, step=step, count=4, stats=stats)


def streamed(channel: grpc.Channel, token: Optional[str], *requests: pb.ReportRequest) -> tuple[Any, ...]:
    """(steps answered, then the status code and message the stream ended with)."""
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    answered: list[int] = []
    try:
        for response in pb_grpc.RegulatorStub(channel).ReportStream(iter(requests), metadata=metadata, timeout=30):
            answered.append(response.step.step)
    except grpc.RpcError as exc:
        return (answered, exc.code(), exc.details())
    return (answered, grpc.StatusCode.OK, "")


def assert_streams_isolated(own: RegulatorClient, other: RegulatorClient, channel: grpc.Channel,
                            own_token: Optional[str], other_token: Optional[str], own_job: str, other_prefix: str) -> None:
    """A stream reaches its tenant's jobs only: a message of another tenant's job ends it with
    the unary Report's PERMISSION_DENIED, the same whether the job exists or not, and the job
    is untouched."""
    run_a_job(own, own_job)
    assert streamed(channel, own_token, stream_report(own_job, 1), stream_report(own_job, 2)) == ([1, 2], grpc.StatusCode.OK, "")
    unary = code_and_message(lambda: other.report(own_job, attempt=0, epoch=1, step=3, count=4, score_sums=STATS, fisher=FISHER))
    for job in (own_job, own_job.rsplit("/", 1)[0] + "/no-such-job"):
        seen = streamed(channel, other_token, stream_report(job, 3))
        assert seen[:2] == ([], grpc.StatusCode.PERMISSION_DENIED) and seen[2] in unary[1], (job, seen, unary)
    # its own job first, then another tenant's: the stream ends there
    other.open_session(other_prefix + "mine", ["a", "b"])
    seen = streamed(channel, other_token, stream_report(other_prefix + "mine", 0, epoch=0), stream_report(own_job, 3))
    assert seen[:2] == ([0], grpc.StatusCode.PERMISSION_DENIED)
    assert own.get_session(own_job).session.steps == 3


@pytest.mark.e2e
def test_report_streams_are_isolated_over_bearer_tokens(two_teams: Path) -> None:
    config = ServerConfig(port=0, limits=roomy_limits(), tenants=Tenants(two_teams, recheck_s=0.0))
    rpcs = "inforeg_regulator_tenant_rpcs_total"
    with RegulatorServer(config) as srv, grpc.insecure_channel(srv.target) as channel:
        with RegulatorClient.connect(srv.target, token=VISION_TOKEN) as vision, \
                RegulatorClient.connect(srv.target, token=AUDIO_TOKEN) as audio:
            assert_streams_isolated(vision, audio, channel, VISION_TOKEN, AUDIO_TOKEN, "vision/resnet", "audio/")
        for token in ("unknown-token-0123456789", None):  # identified at open: nothing is answered
            seen = streamed(channel, token, stream_report("vision/resnet", 4))
            assert seen[:2] == ([], grpc.StatusCode.UNAUTHENTICATED), seen
        # the tenant metrics count a stream's messages, each with its status
        keys = (("vision", "OK"), ("audio", "OK"), ("audio", "PermissionDenied"))
        before = generate_latest(srv.registry).decode()
        streamed(channel, VISION_TOKEN, stream_report("vision/resnet", 4), stream_report("vision/resnet", 5))
        streamed(channel, AUDIO_TOKEN, stream_report("audio/mine", 1, epoch=0), stream_report("vision/resnet", 6))
        after = generate_latest(srv.registry).decode()
    moved = {k: metric(after, rpcs, tenant=k[0], grpc_method="ReportStream", grpc_code=k[1])
             - metric(before, rpcs, tenant=k[0], grpc_method="ReportStream", grpc_code=k[1]) for k in keys}
    assert moved == {("vision", "OK"): 2, ("audio", "OK"): 1, ("audio", "PermissionDenied"): 1}


@pytest.mark.e2e
def test_report_streams_are_isolated_over_mtls_identities(two_teams: Path, tmp_path: Path) -> None:
    pki, config = mtls_server_config(two_teams, tmp_path)

    def channel_as(who: str) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            (pki / "ca.pem").read_bytes(), (pki / f"{who}.key").read_bytes(), (pki / f"{who}.pem").read_bytes()
        )
        return grpc.secure_channel(target, creds)

    with RegulatorServer(config) as srv:
        target = f"localhost:{srv.port}"
        with RegulatorClient.connect(target, tls=tls_as(pki, "vision"), token="") as vision, \
                RegulatorClient.connect(target, tls=tls_as(pki, "audio"), token="") as audio, \
                channel_as("vision") as as_vision, channel_as("audio") as as_audio, channel_as("stranger") as as_stranger:
            run_a_job(audio, "audio/wav2vec")
            assert streamed(as_audio, None, stream_report("audio/wav2vec", 1)) == ([1], grpc.StatusCode.OK, "")
            for job in ("audio/wav2vec", "audio/no-such-job"):
                assert streamed(as_vision, None, stream_report(job, 2))[:2] == ([], grpc.StatusCode.PERMISSION_DENIED)
            assert streamed(as_stranger, None, stream_report("audio/wav2vec", 2))[:2] == ([], grpc.StatusCode.UNAUTHENTICATED)
            assert audio.get_session("audio/wav2vec").session.steps == 2
            vision.list_sessions()


# -- reloads -------------------------------------------------------------------------------------


def refused(client: RegulatorClient) -> bool:
    try:
        client.list_sessions()
    except Unauthenticated:
        return True
    return False


@pytest.mark.e2e
def test_reload_on_change_and_broken_files_keep_the_previous(two_teams: Path, tmp_path: Path) -> None:
    tenants = Tenants(two_teams, recheck_s=0.0, grace_s=0.0)
    with RegulatorServer(ServerConfig(port=0, limits=roomy_limits(), tenants=tenants)) as srv:
        target = srv.target
        with RegulatorClient.connect(target, token=VISION_TOKEN) as vision:
            vision.open_session("vision/a", ["a", "b"])
            # a third team is added: its token works at once
            (tmp_path / "speech.token").write_text("speech-token-0123456789")
            write_tenants(two_teams, entry("vision", "vision/", "vision.token"), entry("audio", "audio/", "audio.token"),
                          entry("speech", "speech/", "speech.token"))
            with RegulatorClient.connect(target, token="speech-token-0123456789") as speech:
                speech.open_session("speech/x", ["a", "b"])
                assert [s.job_id for s in speech.list_sessions()] == ["speech/x"]
                # broken versions: logged, the previous tenants keep serving
                for broken in (
                    "tenants: [\n",
                    "tenants:\n" + entry("vision", "vision/", "vision.token") + entry("speech", "speech/", "vision.token"),
                    "tenants:\n" + entry("vision", "vision/", "vision.token") + entry("speech", "speech/", "later.token"),
                ):
                    reloads = tenants.reloads
                    two_teams.write_text(broken)
                    assert not refused(speech) and not refused(vision)
                    assert tenants.reloads == reloads
                # the missing token file appears: that fixes the file, which loads
                (tmp_path / "later.token").write_text("later-token-0123456789")
                with RegulatorClient.connect(target, token="later-token-0123456789") as later:
                    assert [s.job_id for s in later.list_sessions()] == ["speech/x"]
                assert tenants.reloads == reloads + 1
                assert refused(speech), "the speech tenant's replaced token (no grace here)"
            # a rotated token file: the new token works, the old one is refused (grace 0)
            (tmp_path / "vision.token").write_text("vision-rotated-0123456789")
            with RegulatorClient.connect(target, token="vision-rotated-0123456789") as rotated:
                assert [s.job_id for s in rotated.list_sessions()] == ["vision/a"]
            assert refused(vision)
    assert tenants.reloads == 3


def test_a_rotated_token_keeps_its_grace_for_its_tenant_only(two_teams: Path, tmp_path: Path) -> None:
    tenants = Tenants(two_teams, recheck_s=0.0, grace_s=600.0)
    (tmp_path / "vision.token").write_text("vision-rotated-0123456789")
    vision = tenants.identify(VISION_TOKEN.encode(), ())
    assert isinstance(vision, Tenant) and vision.name == "vision"
    assert tenants.identify(b"vision-rotated-0123456789", ()) == vision
    assert tenants.identify(AUDIO_TOKEN.encode(), (VISION_SAN,)) == CONFLICT
    write_tenants(two_teams, entry("audio", "audio/", "audio.token"))  # vision removed: no grace
    assert tenants.identify(VISION_TOKEN.encode(), ()) == INVALID_TOKEN
    assert tenants.identify(b"vision-rotated-0123456789", ()) == INVALID_TOKEN


# -- metrics -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_metrics_carry_the_tenant_label(two_teams: Path) -> None:
    config = ServerConfig(port=0, metrics_port=0, limits=roomy_limits(), tenants=Tenants(two_teams, recheck_s=0.0))
    with RegulatorServer(config) as srv:
        with RegulatorClient.connect(srv.target, token=VISION_TOKEN) as vision, \
                RegulatorClient.connect(srv.target, token=AUDIO_TOKEN) as audio:
            run_a_job(vision, "vision/a")
            vision.open_session("vision/b", ["a", "b"])
            with pytest.raises(RegulatorError):
                audio.get_session("vision/a")
        with RegulatorClient.connect(srv.target, token="unknown-token-0123456789") as stranger:
            assert refused(stranger)
        text = scrape(srv.metrics_port)  # type: ignore[arg-type]
    rpcs = "inforeg_regulator_tenant_rpcs_total"
    # the client sends its Reports on a stream per job (one tenant count per message) or unary
    assert sum(metric(text, rpcs, tenant="vision", grpc_method=m, grpc_code="OK") for m in ("Report", "ReportStream")) == 1
    assert metric(text, rpcs, tenant="vision", grpc_method="OpenSession", grpc_code="OK") == 2
    assert metric(text, rpcs, tenant="audio", grpc_method="GetSession", grpc_code="PermissionDenied") == 1
    assert metric(text, rpcs, tenant="audio", grpc_method="Report", grpc_code="OK") == 0  # known series start at 0
    assert metric(text, "inforeg_regulator_tenant_sessions_open", tenant="vision") == 2
    assert metric(text, "inforeg_regulator_tenant_sessions_open", tenant="audio") == 0
    assert metric(text, "grpc_server_handled_total", grpc_type="unary", grpc_service="inforeg.regulator.v1.Regulator",
                  grpc_method="ListSessions", grpc_code="Unauthenticated") == 1
    tenant_lines = [l for l in text.splitlines() if l.startswith("inforeg_regulator_tenant")]
    assert tenant_lines and not any("job_id" in l or "vision/a" in l for l in tenant_lines)


# -- the two-team central overlay ----------------------------------------------------------------


def test_two_team_overlay(tmp_path: Path) -> None:
    """overlays/central-tenants: `serve --tenants` (no single token), the tenants file from its
    ConfigMap, each token file from its team's Secret, mounted as directories (reloads reach
    them); the file loads, and serves once the Secrets' files are there."""
    from .test_deploy import container_env, mount_for, regulator_pods, rendered, serve_args, volume

    docs = rendered("overlays/central-tenants")
    ((_, spec, reg),) = regulator_pods(docs)
    args = serve_args([str(a) for a in reg["args"]], container_env(docs, reg))
    assert args.tenants and not args.token_file
    mount = mount_for(reg, args.tenants)
    assert mount.get("readOnly") and "subPath" not in mount
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume(spec, mount["name"])["configMap"]["name"]]
    file_name = str(Path(args.tenants).relative_to(mount["mountPath"]))
    local = tmp_path / "tenants.yaml"
    tokens = {}
    import yaml

    for tenant in yaml.safe_load(cm["data"][file_name])["tenants"]:
        path = tenant["token_file"]
        token_mount = mount_for(reg, path)
        assert token_mount.get("readOnly") and "subPath" not in token_mount
        sources = volume(spec, token_mount["name"])["projected"]["sources"]
        rel = str(Path(path).relative_to(token_mount["mountPath"]))
        (secret,) = [s["secret"] for s in sources if any(i["path"] == rel for i in s["secret"]["items"])]
        assert secret["name"] == f"inforeg-regulator-tenant-{tenant['name']}", secret
        tokens[path] = tmp_path / rel
        tokens[path].write_text(f"{tenant['name']}-token-0123456789")
    text = cm["data"][file_name]
    for path, there in tokens.items():
        text = text.replace(path, str(there))
    local.write_text(text)
    table = load_tenants(local)
    assert [(t.name, t.job_prefix) for t in table.tenants] == [("vision", "vision/"), ("audio", "audio/")]
