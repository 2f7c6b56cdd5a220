"""The /metrics listener: Prometheus exposition of one registry over HTTP or HTTPS, optionally
behind a bearer token.

/metrics carries job ids, modality names and coefficients, so it can be protected the two ways
Prometheus' scrape config supports: ``authorization: {type: Bearer, credentials_file: ...}``
(``--metrics-token-file``) and ``scheme: https`` with ``tls_config`` (``--metrics-tls-cert/-key``,
and ``--metrics-tls-client-ca`` for client certificates). Token and certificate files are
re-read when they change, like the gRPC port's.

The TLS handshake runs in the connection's own thread with a timeout, never in the accept loop,
so one slow client cannot stall the scrapes of others.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from .security import ReloadingSSLContext, TlsFiles, TokenSource

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
REALM = 'Bearer realm="inforeg-regulator-metrics"'


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class' name
        pass  # one line per scrape would drown the server's log


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    tls: Optional[ReloadingSSLContext] = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Runs in the connection's thread: TLS-wraps it here, bounded in time."""
        if self.tls is not None:
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                request = self.tls.current().wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.debug("metrics TLS handshake with %s failed: %s", client_address, exc)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


def _with_token(app: Callable[..., Iterable[bytes]], tokens: TokenSource) -> Callable[..., Iterable[bytes]]:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        scheme, _, sent = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        if scheme.lower() != "bearer" or not tokens.accepts(sent.strip().encode()):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", REALM)])
            return [b"401 Unauthorized: send 'Authorization: Bearer <token>'\n"]
        return app(environ, start_response)

    return guarded


class MetricsEndpoint:
    """Serves ``registry`` at /metrics on ``host:port`` (0 = a free port) until ``stop()``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        token: Optional[TokenSource] = None,
        tls: Optional[TlsFiles] = None,
    ) -> None:
        app: Callable[..., Iterable[bytes]] = make_wsgi_app(registry)
        if token is not None:
            app = _with_token(app, token)
        host = host.strip("[]")
        server_class = _Server6 if ":" in host else _Server
        context = ReloadingSSLContext(tls) if tls is not None else None  # ValueError if unusable
        try:
            self._httpd = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._httpd.tls = context
        self.scheme = "https" if tls is not None else "http"
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="regulator-metrics", daemon=True)

    def start(self) -> "MetricsEndpoint":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()
