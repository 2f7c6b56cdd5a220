"""Is a renewed server certificate one that clients will accept? Checked before it is loaded.

A matching key is not enough: an expired or not-yet-valid certificate, or one that does not chain
to the CA the clients trust, loads fine and then fails every new client's handshake. The check
is a TLS handshake in memory (``ssl.MemoryBIO``, no socket), the server side holding the new
pair and the client side verifying it as a client would: OpenSSL's own date and chain checks,
with the standard library only (the server does not need ``cryptography``).

Which CA: the server knows only ``--tls-client-ca``. Where the starting certificate chains to it
(one cluster CA for servers and clients, the usual cert-manager setup) a renewal must too;
otherwise the server's own CA is unknown here and only the dates are checked (the renewal's
leaf is then its own trust anchor, ``VERIFY_X509_PARTIAL_CHAIN``).
"""

from __future__ import annotations

import logging
import ssl
import tempfile
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

_ROUNDS = 16  # a TLS 1.2/1.3 handshake needs 2-3 flights each way
RETRY_S = 60.0  # a refused renewal is checked again this often while its files stay unchanged
_NO_CHECK_TIME = 0x200000  # OpenSSL's X509_V_FLAG_NO_CHECK_TIME (not named by the ssl module)


class RenewalCheck:
    """What a renewal of one listener's certificate is held to, decided from its starting pair:
    its dates always, its chain to the client CA bundle where the starting certificate chains to
    it. ``check`` raises ValueError for a renewal to refuse."""

    def __init__(self, key: bytes, cert: bytes, ca: Optional[bytes], what: str, retry_s: Optional[float] = None) -> None:
        self.anchored = ca is not None and chains_to(key, cert, ca)
        self._retry_s = RETRY_S if retry_s is None else retry_s
        self._retry_at: Optional[float] = None
        if ca is not None and not self.anchored:
            log.info("the %s certificate does not chain to its client CA bundle: its renewals are checked "
                     "for their dates, not their CA", what)

    def check(self, key: bytes, cert: bytes, ca: Optional[bytes]) -> None:
        try:
            check_certificate(key, cert, ca if self.anchored else None)
        except Exception:
            self._retry_at = time.monotonic() + self._retry_s
            raise
        self._retry_at = None

    def retry_due(self) -> bool:
        """A refused renewal is looked at again every ``retry_s`` while its files stay as they are:
        a not-yet-valid certificate becomes valid without any file changing."""
        return self._retry_at is not None and time.monotonic() >= self._retry_at


def check_certificate(key: bytes, cert: bytes, ca: Optional[bytes] = None, dates: bool = True) -> None:
    """Raises ValueError (naming what a client would say: "certificate has expired", "... is not
    yet valid", "unable to get local issuer certificate") unless a client accepts ``cert``: its
    dates now (unless not ``dates``), and with ``ca`` its chain up to that bundle. ``key``/``cert``
    must form a pair."""
    server = server_context(key, cert)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # the names are the operator's business; dates and chain are checked
    client.verify_mode = ssl.CERT_REQUIRED
    if not dates:
        client.verify_flags |= _NO_CHECK_TIME
    if ca is not None:
        client.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    else:
        client.load_verify_locations(cadata=_first_pem(cert))
        client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        _handshake(server, client)
    except ssl.SSLCertVerificationError as exc:
        against = "against the client CA bundle" if ca is not None else "by its dates"
        raise ValueError(f"a client would refuse the certificate ({against}): {exc.verify_message}") from None
    except ssl.SSLError as exc:
        raise ValueError(f"a TLS handshake with the certificate fails: {exc.reason or exc}") from None


def server_context(key: bytes, cert: bytes) -> ssl.SSLContext:
    """A TLS server context holding ``key`` and ``cert`` (``ssl.SSLError`` when they are no pair);
    ssl loads a pair only from files, so they pass through a private temporary directory."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="regulator-tls-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def chains_to(key: bytes, cert: bytes, ca: bytes) -> bool:
    """Whether ``cert`` chains to ``ca``, whatever its dates (decides if renewals are held to that CA)."""
    try:
        check_certificate(key, cert, ca, dates=False)
    except ValueError:
        return False
    return True


def _first_pem(chain: bytes) -> str:
    text = chain.decode("ascii", "replace")
    end = "-----END CERTIFICATE-----"
    cut = text.find(end)
    return text if cut < 0 else text[: cut + len(end)] + "\n"


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    """Runs both ends of one handshake over memory buffers until the client has verified the
    server (raises what the client raises)."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server_done = False
    for _ in range(_ROUNDS):
        try:
            client.do_handshake()
            return
        except ssl.SSLWantReadError:
            pass
        s_in.write(c_out.read())
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
    raise ssl.SSLError("the handshake did not complete")
