"""Assembles and runs a regulator server: gRPC with health and reflection, the session manager
over a store, and a Prometheus endpoint.

``RegulatorServer`` owns start and stop so that tests, ``regulator replay`` and ``regulator serve``
run the very same server; ``serve`` adds signal handling.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry

from inforeg.regulator.v1 import regulator_pb2 as pb

from .api import build_api
from .interceptors import DelayInterceptor, MalformedRequestInterceptor, MetricsInterceptor, method_paths
from .model import Limits
from .policy import BUILTIN_PROFILES, ProfileRegistry
from .metrics import GrpcServerMetrics, RegulatorMetrics, add_runtime_collectors
from .metrics_http import MetricsEndpoint
from .security import BearerTokenInterceptor, ReloadingServerCredentials, TlsFiles, TokenSource
from .servicer import RegulatorServicer
from .storage import MemoryStore, SQLiteStore, StateStore, StoreError
from .storage.instrumented import InstrumentedStore
from .storage.lockfile import StateDirLock
from .wire_handlers import add_regulator_servicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Regulator"].full_name
# Health names (kubelet probes): readiness follows the store (NOT_SERVING while it fails: a
# restart cannot empty a full disk or repair a corrupt file); liveness answers for the process,
# SERVING from start until shutdown, so that only what a restart cures restarts the regulator.
READINESS_NAMES = ("", SERVICE_NAME)
LIVENESS_NAME = "inforeg.regulator.v1.Liveness"
# Every method this server registers; only these get their own grpc_method label value.
REGISTERED_METHODS = method_paths(
    (
        pb.DESCRIPTOR.services_by_name["Regulator"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    )
)
# RPCs admitted at once (running + queued for a worker); beyond it gRPC answers
# RESOURCE_EXHAUSTED at once instead of queueing without bound. 8 per worker thread of the
# default 16: a burst of 128 DDP ranks reporting the same step is admitted whole.
DEFAULT_MAX_CONCURRENT_RPCS = 128
STORE_WATCH_INTERVAL_S = 0.5  # how often health checks (and, while failing, probes) the store
PRUNE_INTERVAL_S = 60.0  # how often step records past their retention are pruned


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = pick a free port
    metrics_host: str = "127.0.0.1"
    metrics_port: Optional[int] = None  # None = no metrics endpoint; 0 = free port
    metrics_token: Optional[TokenSource] = None  # bearer token required on /metrics
    metrics_tls: Optional[TlsFiles] = None  # HTTPS on /metrics (client_ca: client certificates)
    health_port: Optional[int] = None  # plaintext, health service only (kubelet probes)
    health_host: Optional[str] = None  # address of the health port; None = host
    uds: Optional[str] = None  # also listen on this Unix domain socket path
    state_dir: Optional[Path] = None  # None = in memory only
    max_workers: int = 16
    max_concurrent_rpcs: Optional[int] = DEFAULT_MAX_CONCURRENT_RPCS  # None = unbounded
    max_receive_bytes: int = 1 << 20
    grace_seconds: float = 10.0
    limits: Limits = field(default_factory=Limits)
    profiles: ProfileRegistry = BUILTIN_PROFILES  # built-ins plus the --plugin profiles
    metrics_max_jobs: int = 100
    token: Optional[TokenSource] = None  # bearer token required on Regulator RPCs
    tls: Optional[TlsFiles] = None
    debug_delay_s: float = 0.0  # fault injection: every Regulator RPC sleeps this long first
    debug_hold_file: Optional[str] = None  # fault injection: every Regulator RPC waits while this file exists
    debug_max_state_bytes: Optional[int] = None  # fault injection: the state file stops growing here (disk full)


class RegulatorServer:
    """One regulator instance. ``start()`` binds and serves; ``stop()`` drains and flushes."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        add_runtime_collectors(self.registry)
        self.metrics = RegulatorMetrics(self.registry, max_jobs=config.metrics_max_jobs)
        self.grpc_metrics = GrpcServerMetrics(self.registry)
        # A state file we cannot use must not crash the server nor be overwritten: we serve
        # health (NOT_SERVING), metrics and logs, and answer UNAVAILABLE with the reason.
        self.store_error: Optional[str] = None
        inner: StateStore = MemoryStore()
        self._state_lock: Optional[StateDirLock] = None
        if config.state_dir is not None:
            # one server per state dir: a second one stops here (StateDirLocked), before serving
            self._state_lock = StateDirLock.acquire(config.state_dir)
            try:
                inner = SQLiteStore(
                    config.state_dir,
                    profiles=config.profiles,
                    lock=self._state_lock,
                    timeout_s=config.limits.store_timeout_s,
                    max_bytes=config.debug_max_state_bytes,
                )
            except StoreError as exc:
                self.store_error = str(exc)
                log.error("state store unusable, serving UNAVAILABLE until fixed: %s", exc)
                self.metrics.store_healthy.set(0)
        self.store = InstrumentedStore(inner, self.metrics.timed_write)
        self.api = build_api(self.store, self.metrics, config.limits, profiles=config.profiles)
        self.manager = self.api.manager
        self.health = health.HealthServicer(experimental_non_blocking=True)
        # Metrics outermost (refused calls are counted, under bounded labels), then the token,
        # then decoding: an unauthenticated request is never deserialized.
        interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor(self.grpc_metrics, REGISTERED_METHODS)]
        if config.token is not None:
            interceptors.append(BearerTokenInterceptor(config.token))
        interceptors.append(MalformedRequestInterceptor())
        if config.debug_delay_s > 0 or config.debug_hold_file:
            interceptors.append(DelayInterceptor(config.debug_delay_s, SERVICE_NAME, config.debug_hold_file))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="regulator-rpc"),
            interceptors=interceptors,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.so_reuseport", 0),  # a port clash must be an error, not a silent second server
                ("grpc.max_receive_message_length", config.max_receive_bytes),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        servicer = RegulatorServicer(self.api, self.metrics, unavailable=self.store_error)
        add_regulator_servicer(servicer, self._server)  # GetSession answers pre-encoded bytes
        self.metrics.track_memory(self.manager.budget)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._health_server: Optional[grpc.Server] = None
        if config.health_port is not None:
            # A server of its own: probes are answered even while the main port sheds load.
            self._health_server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="regulator-health"),
                options=[("grpc.so_reuseport", 0)],
                maximum_concurrent_rpcs=16,
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
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
        """Health goes NOT_SERVING, in-flight calls finish within ``grace``, state is flushed."""
        if self._stopped.is_set():
            return
        self._stopped.set()
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
