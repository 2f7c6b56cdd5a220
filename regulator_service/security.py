"""Who may call: bearer tokens (constant-time compare, rotatable file) and TLS credentials."""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import grpc

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

    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except health and reflection."""

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
            return _deny("missing bearer token: send metadata 'authorization: Bearer <token>'")
        scheme, _, token = sent.partition(" ")
        raw = token.strip().encode() if isinstance(token, str) else b""
        if scheme.lower() != "bearer" or not self._tokens.accepts(raw):
            return _deny("invalid bearer token")
        return continuation(details)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Optional[Path] = None  # set: clients must present a certificate signed by it (mTLS)

    def server_credentials(self) -> grpc.ServerCredentials:
        try:
            key, cert = self.key.read_bytes(), self.cert.read_bytes()
            ca = self.client_ca.read_bytes() if self.client_ca else None
        except OSError as exc:
            raise ValueError(f"cannot read TLS files: {exc}") from exc
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


def token_from_env(env: Optional[dict[str, str]] = None) -> Optional[TokenSource]:
    """The client side: REGULATOR_TOKEN, else the (re-read) file named by REGULATOR_TOKEN_FILE."""
    env = dict(os.environ) if env is None else env
    if env.get("REGULATOR_TOKEN"):
        return TokenSource(token=env["REGULATOR_TOKEN"])
    path = env.get("REGULATOR_TOKEN_FILE")
    if path:
        return TokenSource(path=Path(path))
    return None
