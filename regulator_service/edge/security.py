"""Who may call: bearer tokens (constant-time compare, rotatable file) and TLS credentials."""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import grpc

from .cert_checks import RenewalCheck, server_context

log = logging.getLogger(__name__)

# Kubernetes probes and grpcurl can send neither tokens nor client certificates.
EXEMPT_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")


class TokenSource:
    """A bearer token: a fixed value, or a file re-read when it changes (a rotated Kubernetes
    Secret) at most every ``recheck_s`` seconds. After a rotation the previous token stays valid
    for ``grace_s`` seconds, so running jobs can pick up the new file without failing a call."""

    def __init__(
        self,
        token: Optional[str] = None,
        path: Optional[Path] = None,
        recheck_s: float = 5.0,
        grace_s: float = 600.0,
    ) -> None:
        if (token is None) == (path is None):
            raise ValueError("give exactly one of token or path")
        self._path = path
        self._recheck_s = recheck_s
        self._grace_s = grace_s
        self._lock = threading.Lock()
        self._checked = 0.0
        self._mtime: Optional[float] = None
        self._token = self._validate(token) if token is not None else self._read()
        self._previous: Optional[bytes] = None
        self._previous_until = 0.0

    @staticmethod
    def _validate(token: str) -> bytes:
        token = token.strip()
        if len(token) < 16:
            raise ValueError("the bearer token must be at least 16 characters")
        return token.encode()

    def _read(self) -> bytes:
        assert self._path is not None
        try:
            self._mtime = self._path.stat().st_mtime
            return self._validate(self._path.read_text())
        except OSError as exc:
            raise ValueError(f"cannot read token file {self._path}: {exc}") from exc

    def current(self) -> bytes:
        if self._path is None:
            return self._token
        now = time.monotonic()
        if now - self._checked >= self._recheck_s:
            with self._lock:
                self._checked = now
                try:
                    if self._path.stat().st_mtime != self._mtime:
                        token = self._read()
                        if token != self._token:
                            self._previous, self._previous_until = self._token, now + self._grace_s
                            self._token = token
                            log.info("bearer token reloaded from %s", self._path)
                except (OSError, ValueError) as exc:  # keep the last good token
                    log.error("token file %s unusable, keeping the previous token: %s", self._path, exc)
        return self._token

    def accepts(self, sent: bytes) -> bool:
        """Constant-time comparison with the current token (and the previous one in its grace)."""
        ok = hmac.compare_digest(sent, self.current())
        previous = self._previous
        if previous is not None and time.monotonic() < self._previous_until:
            ok |= hmac.compare_digest(sent, previous)
        return ok


def _deny(message: str) -> grpc.RpcMethodHandler:
    def abort(request: object, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # No deserializer: an unauthenticated request body is never parsed.
    return grpc.unary_unary_rpc_method_handler(abort)


_MISSING = _deny("missing bearer token: send metadata 'authorization: Bearer <token>'")
_INVALID = _deny("invalid bearer token")


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except health and reflection.

    A refused call gets one of two handlers built once: nothing is allocated per caller before
    the token is checked, whatever method name the caller made up."""

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Optional[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        service = details.method.lstrip("/").rpartition("/")[0]
        if service in EXEMPT_SERVICES:
            return continuation(details)
        sent = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                sent = value
                break
        if sent is None:
            return _MISSING
        scheme, _, token = sent.partition(" ")
        raw = token.strip().encode() if isinstance(token, str) else b""
        if scheme.lower() != "bearer" or not self._tokens.accepts(raw):
            return _INVALID
        return continuation(details)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Optional[Path] = None  # set: clients must present a certificate signed by it (mTLS)

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def read(self) -> tuple[bytes, bytes, Optional[bytes]]:
        """(key, cert chain, client CA), checked to form a usable server identity."""
        try:
            key, cert = self.key.read_bytes(), self.cert.read_bytes()
            ca = self.client_ca.read_bytes() if self.client_ca else None
        except OSError as exc:
            raise ValueError(f"cannot read TLS files: {exc}") from exc
        check_server_identity(key, cert, ca)
        return key, cert, ca


def check_server_identity(key: bytes, cert: bytes, ca: Optional[bytes] = None) -> None:
    """Raises ValueError unless ``cert`` is a PEM chain whose first certificate matches ``key``
    (and ``ca`` parses). gRPC would accept a mismatched pair and fail every handshake later."""
    try:
        ctx = server_context(key, cert)
    except ssl.SSLError as exc:
        raise ValueError(f"the TLS certificate and key do not form a usable pair: {exc.reason or exc}") from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"the client CA bundle is not a PEM certificate: {exc}") from None


class FileWatch:
    """Tells whether files changed since the last look (inode, size, mtime; symlinks followed,
    so a Kubernetes Secret volume's atomic ``..data`` swap counts), at most every ``recheck_s``."""

    def __init__(self, paths: Sequence[Path], recheck_s: float = 0.0) -> None:
        self._paths = tuple(paths)
        self._recheck_s = recheck_s
        self._checked = time.monotonic()
        self._seen = self.signature()

    def signature(self) -> tuple[tuple[int, int, int, int], ...]:
        out = []
        for p in self._paths:
            try:
                st = os.stat(p)
                out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((-1, -1, -1, -1))
        return tuple(out)

    def changed(self) -> bool:
        """True once per change (the new state becomes the one seen)."""
        now = time.monotonic()
        if now - self._checked < self._recheck_s:
            return False
        self._checked = now
        sig = self.signature()
        if sig == self._seen:
            return False
        self._seen = sig
        return True


class ReloadingServerCredentials:
    """Server TLS that follows its files: gRPC asks ``fetch`` before every new connection's
    handshake; it answers a new configuration when the files changed and the new pair is usable.
    A broken renewal is logged and the last good certificate keeps serving. Established
    connections are never dropped."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._watch = FileWatch(files.paths())
        self._lock = threading.Lock()
        self.reloads = 0
        key, cert, ca = files.read()
        self._renewal = RenewalCheck(key, cert, ca, "server")  # dates, and the CA where it chains to one
        self._initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=self._files.client_ca is not None
        )

    def fetch(self) -> Optional[grpc.ServerCertificateConfiguration]:
        with self._lock:
            if not self._watch.changed() and not self._renewal.retry_due():
                return None
            try:
                key, cert, ca = self._files.read()
                self._renewal.check(key, cert, ca)
            except Exception as exc:  # called from gRPC's handshake: never raise into it
                log.error("TLS files %s changed but are unusable, keeping the previous certificate: %s", self._files.cert, exc)
                return None
            self.reloads += 1
            log.info("TLS certificate reloaded from %s", self._files.cert)
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


class ReloadingSSLContext:
    """An ``ssl.SSLContext`` for an HTTPS listener (the metrics endpoint), rebuilt when its files
    change; ``current()`` is asked once per accepted connection."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._watch = FileWatch(files.paths())
        self._lock = threading.Lock()
        self._context = self._build()
        self._renewal = RenewalCheck(*files.read(), "metrics")

    def _build(self) -> ssl.SSLContext:
        self._files.read()  # raises ValueError with a clear message when unusable
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self._files.cert, self._files.key)
        if self._files.client_ca is not None:
            ctx.load_verify_locations(cafile=str(self._files.client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def current(self) -> ssl.SSLContext:
        with self._lock:
            if self._watch.changed() or self._renewal.retry_due():
                try:
                    self._renewal.check(*self._files.read())
                    self._context = self._build()
                    log.info("metrics TLS certificate reloaded from %s", self._files.cert)
                except Exception as exc:  # keep serving with the last good pair
                    log.error("metrics TLS files changed but are unusable, keeping the previous ones: %s", exc)
            return self._context


def token_from_env(env: Optional[dict[str, str]] = None) -> Optional[TokenSource]:
    """The client side: REGULATOR_TOKEN, else the (re-read) file named by REGULATOR_TOKEN_FILE."""
    env = dict(os.environ) if env is None else env
    if env.get("REGULATOR_TOKEN"):
        return TokenSource(token=env["REGULATOR_TOKEN"])
    path = env.get("REGULATOR_TOKEN_FILE")
    if path:
        return TokenSource(path=Path(path))
    return None
