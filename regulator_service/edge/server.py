"""Runs a regulator server: gRPC with health and reflection, the session manager over a store,
and a Prometheus endpoint (its parts are built by ``assembly.py``).

``RegulatorServer`` owns start and stop so that tests, ``regulator replay`` and ``regulator serve``
run the very same server; ``serve`` adds signal handling.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2

from ..wire.api import build_api
from . import assembly
from .assembly import (  # re-exported: what a server is configured with
    DEFAULT_MAX_CONCURRENT_RPCS,
    LIVENESS_NAME,
    READINESS_NAMES,
    REGISTERED_METHODS,
    SERVICE_NAME,
    ServerConfig,
)
from .metrics_http import MetricsEndpoint
from .security import ReloadingServerCredentials
from .servicer import RegulatorServicer

log = logging.getLogger(__name__)

STORE_WATCH_INTERVAL_S = 0.5  # how often health checks (and, while failing, probes) the store
PRUNE_INTERVAL_S = 60.0  # how often step records past their retention are pruned


class RegulatorServer:
    """One regulator instance. ``start()`` binds and serves; ``stop()`` drains and flushes."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry, self.metrics, self.grpc_metrics = assembly.make_metrics(config.metrics_max_jobs)
        # A state file we cannot use must not crash the server nor be overwritten: we serve
        # health (NOT_SERVING), metrics and logs, and answer UNAVAILABLE with the reason.
        opened = assembly.open_store(config, self.metrics)
        self.store, self.store_error, self._state_lock = opened.store, opened.error, opened.lock
        self.api = build_api(self.store, self.metrics, config.limits, profiles=config.profiles, ownership=opened.ownership)
        self.manager = self.api.manager
        self.metrics.track_memory(self.manager.budget)
        self.metrics.track_sessions(self.manager.open_sessions)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.servicer = RegulatorServicer(self.api, self.metrics, unavailable=self.store_error)
        self._server = assembly.make_grpc_server(
            config, self.servicer, self.grpc_metrics, self.health, self.manager.open_sessions,
        )
        self._health_server = assembly.make_health_server(self.health) if config.health_port is not None else None
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self.health_port: Optional[int] = None
        self._metrics_http: Optional[MetricsEndpoint] = None
        self.metrics_scheme: Optional[str] = None
        self.tls_credentials: Optional[ReloadingServerCredentials] = None
        self._stopped = threading.Event()
        self._sweeper: Optional[threading.Thread] = None
        self._watcher: Optional[threading.Thread] = None

    def _listen(self, server: grpc.Server, address: str, secure: bool) -> int:
        try:
            if secure and self.config.tls is not None:
                if self.tls_credentials is None:
                    self.tls_credentials = ReloadingServerCredentials(self.config.tls)
                return server.add_secure_port(address, self.tls_credentials.credentials())
            return server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None

    @property
    def health_host(self) -> str:
        return self.config.health_host or self.config.host

    def start(self) -> "RegulatorServer":
        """Binds everything, then serves. Any failure (a port taken, unusable TLS files) raises
        OSError or ValueError with a one-line message naming what failed, and releases what was
        already bound."""
        try:
            self._start()
        except BaseException:
            self._abort_start()
            raise
        return self

    def _start(self) -> None:
        c = self.config
        ensure_bindable(c.host, c.port)
        if c.health_port is not None:
            ensure_bindable(self.health_host, c.health_port)
        if c.metrics_port is not None:
            ensure_bindable(c.metrics_host, c.metrics_port)
        if self.store_error is None:
            restored = self.manager.restore()
            if restored:
                log.info("restored %d open session(s) from %s", restored, c.state_dir)
        self.port = self._listen(self._server, f"{_bracketed(c.host)}:{c.port}", secure=True)
        if c.uds:
            Path(c.uds).unlink(missing_ok=True)  # a stale socket from a killed server
            self._listen(self._server, f"unix:{c.uds}", secure=False)
        if self._health_server is not None:
            self.health_port = self._listen(
                self._health_server, f"{_bracketed(self.health_host)}:{c.health_port}", secure=False
            )
        if c.metrics_port is not None:
            self._metrics_http = MetricsEndpoint(
                self.registry, c.metrics_host, c.metrics_port, token=c.metrics_token, tls=c.metrics_tls
            )
            self.metrics_port = self._metrics_http.port
            self.metrics_scheme = self._metrics_http.scheme
        self._server.start()
        if self._health_server is not None:
            self._health_server.start()
        if self._metrics_http is not None:
            self._metrics_http.start()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.store_error is None
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in READINESS_NAMES:
            self.health.set(service, status)
        self.health.set(LIVENESS_NAME, health_pb2.HealthCheckResponse.SERVING)
        if c.limits.session_ttl_s > 0:
            self._sweeper = threading.Thread(target=self._sweep, name="regulator-ttl", daemon=True)
            self._sweeper.start()
        if self.store_error is None:
            self._watcher = threading.Thread(target=self._watch_store, name="regulator-store-watch", daemon=True)
            self._watcher.start()

    def _abort_start(self) -> None:
        """Releases the ports and the store of a start that failed half-way."""
        self._stopped.set()
        for server in (self._server, self._health_server):
            if server is not None:
                server.stop(None)
        if self._metrics_http is not None:
            self._metrics_http.stop()
            self._metrics_http = None
        try:
            self.manager.close_store()
        except Exception:  # the original error is the one to report
            log.debug("closing the store after a failed start", exc_info=True)
        if self._state_lock is not None:
            self._state_lock.release()

    def _sweep(self) -> None:
        """Expires idle sessions; the expiry is persisted like any other state change."""
        interval = min(max(self.config.limits.session_ttl_s / 4, 0.05), 30.0)
        while not self._stopped.wait(interval):
            try:
                self.manager.expire_idle()
            except Exception:  # never let the sweeper die silently
                log.exception("session expiry sweep failed")

    def _watch_store(self) -> None:
        """Health follows the store: NOT_SERVING while writes fail (disk full, locked, hung, the
        file removed), SERVING again once a probe write succeeds. Also prunes old step records."""
        healthy = True
        next_prune = 0.0
        retention = self.config.limits.step_retention_s
        prune_every = min(PRUNE_INTERVAL_S, max(retention / 4, STORE_WATCH_INTERVAL_S))
        while not self._stopped.wait(STORE_WATCH_INTERVAL_S):
            try:
                problem = self.manager.store_health(probe=True)
                if self._stopped.is_set():
                    return
                if (problem is None) != healthy:
                    healthy = problem is None
                    if healthy:
                        log.warning("state store healthy again: SERVING")
                    else:
                        log.error("state store failing, health NOT_SERVING: %s", problem)
                    status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
                    for service in READINESS_NAMES:
                        self.health.set(service, status)
                    self.metrics.store_healthy.set(1 if healthy else 0)
                if healthy and retention > 0 and time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + prune_every
                    self.manager.prune_steps()
            except Exception:  # never let the watcher die silently
                log.exception("state store watch failed")

    @property
    def target(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def stop(self, grace: Optional[float] = None) -> None:
        """Health goes NOT_SERVING, in-flight calls finish within ``grace``, state is flushed.
        An open Report stream ends with UNAVAILABLE after the answer to its next message, or,
        idle, when ``grace`` ends (grpc cancels the calls left: its client sees UNAVAILABLE)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.servicer.draining.set()
        self.health.enter_graceful_shutdown()
        self._server.stop(self.config.grace_seconds if grace is None else grace).wait()
        if self._health_server is not None:
            self._health_server.stop(0).wait()
        if self._metrics_http is not None:
            self._metrics_http.stop()
        self.manager.close_store()
        if self._state_lock is not None:
            self._state_lock.release()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> "RegulatorServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bracketed(host: str) -> str:
    """An IPv6 literal in the ``[addr]:port`` form gRPC expects."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def ensure_bindable(host: str, port: int) -> None:
    """Raises OSError("cannot listen on HOST:PORT: Address already in use") when the port is taken.

    gRPC reports a failed bind only as "Failed to bind" (and logs the errno from C++), so the
    address is tried with a plain socket first, with gRPC's SO_REUSEADDR, to give the operator
    the reason in one line. Port 0 always binds."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
                # e.g. no IPv6 on this host: gRPC binds the addresses that exist


__all__ = [
    "DEFAULT_MAX_CONCURRENT_RPCS",
    "LIVENESS_NAME",
    "READINESS_NAMES",
    "REGISTERED_METHODS",
    "SERVICE_NAME",
    "RegulatorServer",
    "ServerConfig",
    "ensure_bindable",
]
