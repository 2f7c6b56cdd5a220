"""Certificate renewals are checked before they are loaded (issue 19 item 4): an expired or
not-yet-valid certificate with its matching key, or - where the starting certificate chains to
``--tls-client-ca`` - one from another CA, is logged and the previous pair keeps serving (a new
client's handshake still succeeds, with the old certificate); a good renewal is loaded. Real
X.509 certificates made with ``cryptography``, a real gRPC server with TLS on loopback."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from regulator_client import RegulatorClient
from regulator_client.transport import TlsConfig
from regulator_service.edge import cert_checks
from regulator_service.edge.security import ReloadingServerCredentials, ReloadingSSLContext, TlsFiles
from regulator_service.edge.server import RegulatorServer, ServerConfig

from .conftest import wait_until
from .pki import Pki, make_pki

NOW = datetime.datetime.now(datetime.timezone.utc)
HOUR = datetime.timedelta(hours=1)


def issue(pki_dir: Path, out: Path, not_before: datetime.datetime, not_after: datetime.datetime) -> tuple[bytes, bytes]:
    """A server certificate (localhost, 127.0.0.1) signed by the CA of ``pki_dir``, with a new
    key: (cert PEM, key PEM)."""
    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, out.name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def install(live: TlsFiles, cert: bytes, key: bytes) -> None:
    """As a Secret volume update would: each file replaced whole."""
    for path, data in ((live.key, key), (live.cert, cert)):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def served(port: int, pki: Pki, client_cert: bool) -> bytes:
    """The DER of the certificate a new TLS connection is served (ALPN h2, as gRPC clients)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if client_cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock, ctx.wrap_socket(sock) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def live_files(tmp_path: Path, pki: Pki, client_ca: Optional[Path]) -> TlsFiles:
    live = TlsFiles(tmp_path / "tls.crt", tmp_path / "tls.key", client_ca)
    install(live, pki.server_cert.read_bytes(), pki.server_key.read_bytes())
    return live


@pytest.mark.e2e
@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_expired_not_yet_valid_and_wrong_ca_renewals_keep_the_previous_pair(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mutual: bool
) -> None:
    pki, other = make_pki(tmp_path), make_pki(_mkdir(tmp_path / "other"))
    live = live_files(tmp_path, pki, pki.ca if mutual else None)
    tls = TlsConfig(str(pki.ca), str(pki.client_cert), str(pki.client_key)) if mutual else TlsConfig(ca=str(pki.ca))
    first = der(pki.server_cert.read_bytes())
    refused = [
        ("expired", issue(tmp_path, tmp_path / "expired", NOW - 48 * HOUR, NOW - HOUR), "certificate has expired"),
        ("not yet valid", issue(tmp_path, tmp_path / "early", NOW + HOUR, NOW + 48 * HOUR), "certificate is not yet valid"),
    ]
    if mutual:  # the starting certificate chains to --tls-client-ca: a renewal must too
        refused.append(("another CA", issue(other.ca.parent, tmp_path / "rogue", NOW - HOUR, NOW + 48 * HOUR), "against the client CA"))
    caplog.set_level(logging.INFO, logger="regulator_service.edge")
    with RegulatorServer(ServerConfig(port=0, metrics_port=None, tls=live)) as srv:
        target = f"localhost:{srv.port}"
        with RegulatorClient.connect(target, tls=tls, timeout=30) as client:
            client.open_session("renewal", ["a", "b"])
        for what, (cert, key), reason in refused:
            caplog.clear()
            install(live, cert, key)
            assert served(srv.port, pki, mutual) == first, what  # the previous pair serves on
            with RegulatorClient.connect(target, tls=tls, timeout=30) as client:  # a new client's handshake
                assert [s.job_id for s in client.list_sessions()] == ["renewal"], what
            assert any("keeping the previous certificate" in r.getMessage() and reason in r.getMessage()
                       for r in caplog.records), (what, [r.getMessage() for r in caplog.records])
        cert, key = issue(tmp_path, tmp_path / "renewed", NOW - HOUR, NOW + 48 * HOUR)
        install(live, cert, key)
        assert served(srv.port, pki, mutual) == der(cert)  # a good renewal is loaded
        with RegulatorClient.connect(target, tls=tls, timeout=30) as client:
            assert [s.job_id for s in client.list_sessions()] == ["renewal"]


def test_a_renewal_refused_as_not_yet_valid_is_loaded_once_it_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing changes on disk when the renewal's notBefore passes: the refused renewal is looked at again."""
    monkeypatch.setattr(cert_checks, "RETRY_S", 0.0)
    pki = make_pki(tmp_path)
    live = live_files(tmp_path, pki, None)
    creds = ReloadingServerCredentials(live)
    valid_from = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
    install(live, *issue(tmp_path, tmp_path / "soon", valid_from, valid_from + 48 * HOUR))
    assert creds.fetch() is None and creds.reloads == 0
    wait_until(lambda: creds.fetch() is not None, "the renewal became valid and was loaded")
    assert creds.reloads == 1
    assert creds.fetch() is None  # loaded once


def test_the_metrics_listener_refuses_an_expired_renewal_too(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    live = live_files(tmp_path, pki, pki.ca)
    https = ReloadingSSLContext(live)
    before = https.current()
    install(live, *issue(tmp_path, tmp_path / "expired", NOW - 48 * HOUR, NOW - HOUR))
    assert https.current() is before
    install(live, *issue(tmp_path, tmp_path / "renewed", NOW - HOUR, NOW + 48 * HOUR))
    assert https.current() is not before


def test_a_server_certificate_from_its_own_ca_is_held_to_its_dates_only(tmp_path: Path) -> None:
    """Server and client certificates from different CAs: the server CA is unknown to the
    server, so a renewal from a new one (a CA rotation) is accepted when its dates are good."""
    pki, servers, rotated = make_pki(tmp_path), make_pki(_mkdir(tmp_path / "s")), make_pki(_mkdir(tmp_path / "r"))
    check = cert_checks.RenewalCheck(servers.server_key.read_bytes(), servers.server_cert.read_bytes(), pki.ca.read_bytes(), "server")
    assert not check.anchored
    cert, key = issue(rotated.ca.parent, tmp_path / "rotated", NOW - HOUR, NOW + 48 * HOUR)
    check.check(key, cert, pki.ca.read_bytes())
    cert, key = issue(rotated.ca.parent, tmp_path / "old", NOW - 48 * HOUR, NOW - HOUR)
    with pytest.raises(ValueError, match="certificate has expired"):
        check.check(key, cert, pki.ca.read_bytes())


def test_whether_renewals_are_held_to_the_client_ca_does_not_depend_on_the_first_certificates_dates(tmp_path: Path) -> None:
    pki, other = make_pki(tmp_path), make_pki(_mkdir(tmp_path / "other"))
    cert, key = issue(tmp_path, tmp_path / "old", NOW - 48 * HOUR, NOW - HOUR)  # started with an expired one
    check = cert_checks.RenewalCheck(key, cert, pki.ca.read_bytes(), "server")
    assert check.anchored
    cert, key = issue(other.ca.parent, tmp_path / "rogue", NOW - HOUR, NOW + 48 * HOUR)
    with pytest.raises(ValueError, match="against the client CA bundle"):
        check.check(key, cert, pki.ca.read_bytes())


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
