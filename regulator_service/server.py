"""Assembles and runs a regulator server: gRPC with health and reflection, the session manager
over a store, and a Prometheus endpoint.

``RegulatorServer`` owns start and stop so that tests, ``regulator replay`` and ``regulator serve``
run the very same server; ``serve`` adds signal handling.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc

from .api import build_api
from .interceptors import DelayInterceptor, MalformedRequestInterceptor, MetricsInterceptor
from .model import Limits
from .policy import BUILTIN_PROFILES, ProfileRegistry
from .metrics import GrpcServerMetrics, RegulatorMetrics
from .security import BearerTokenInterceptor, TlsFiles, TokenSource
from .servicer import RegulatorServicer
from .storage import MemoryStore, SQLiteStore, StateStore, StoreError
from .storage.instrumented import InstrumentedStore

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Regulator"].full_name


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = pick a free port
    metrics_host: str = "127.0.0.1"
    metrics_port: Optional[int] = None  # None = no metrics endpoint; 0 = free port
    health_port: Optional[int] = None  # plaintext, health service only (kubelet probes)
    uds: Optional[str] = None  # also listen on this Unix domain socket path
    state_dir: Optional[Path] = None  # None = in memory only
    max_workers: int = 16
    max_receive_bytes: int = 1 << 20
    grace_seconds: float = 10.0
    limits: Limits = field(default_factory=Limits)
    profiles: ProfileRegistry = BUILTIN_PROFILES  # built-ins plus the --plugin profiles
    metrics_max_jobs: int = 100
    token: Optional[TokenSource] = None  # bearer token required on Regulator RPCs
    tls: Optional[TlsFiles] = None
    debug_delay_s: float = 0.0  # fault injection: every Regulator RPC sleeps this long first


class RegulatorServer:
    """One regulator instance. ``start()`` binds and serves; ``stop()`` drains and flushes."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = RegulatorMetrics(self.registry, max_jobs=config.metrics_max_jobs)
        self.grpc_metrics = GrpcServerMetrics(self.registry)
        # A state file we cannot use must not crash the server nor be overwritten: we serve
        # health (NOT_SERVING), metrics and logs, and answer UNAVAILABLE with the reason.
        self.store_error: Optional[str] = None
        inner: StateStore = MemoryStore()
        if config.state_dir is not None:
            try:
                inner = SQLiteStore(config.state_dir, profiles=config.profiles)
            except StoreError as exc:
                self.store_error = str(exc)
                log.error("state store unusable, serving UNAVAILABLE until fixed: %s", exc)
                self.metrics.store_healthy.set(0)
        self.store = InstrumentedStore(inner, self.metrics.timed_write)
        self.api = build_api(self.store, self.metrics, config.limits, profiles=config.profiles)
        self.manager = self.api.manager
        self.health = health.HealthServicer(experimental_non_blocking=True)
        interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor(self.grpc_metrics)]
        if config.token is not None:
            interceptors.append(BearerTokenInterceptor(config.token))
        interceptors.append(MalformedRequestInterceptor())
        if config.debug_delay_s > 0:
            interceptors.append(DelayInterceptor(config.debug_delay_s, SERVICE_NAME))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="regulator-rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),  # a port clash must be an error, not a silent second server
                ("grpc.max_receive_message_length", config.max_receive_bytes),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        servicer = RegulatorServicer(self.api, self.metrics, unavailable=self.store_error)
        pb_grpc.add_RegulatorServicer_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._health_server: Optional[grpc.Server] = None
        if config.health_port is not None:
            self._health_server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="regulator-health"),
                options=[("grpc.so_reuseport", 0)],
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self.health_port: Optional[int] = None
        self._metrics_http = None
        self._stopped = threading.Event()
        self._sweeper: Optional[threading.Thread] = None

    def _listen(self, server: grpc.Server, address: str, secure: bool) -> int:
        try:
            if secure and self.config.tls is not None:
                return server.add_secure_port(address, self.config.tls.server_credentials())
            return server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from exc

    def start(self) -> "RegulatorServer":
        if self.store_error is None:
            restored = self.manager.restore()
            if restored:
                log.info("restored %d open session(s) from %s", restored, self.config.state_dir)
        self.port = self._listen(self._server, f"{self.config.host}:{self.config.port}", secure=True)
        if self.config.uds:
            Path(self.config.uds).unlink(missing_ok=True)  # a stale socket from a killed server
            self._listen(self._server, f"unix:{self.config.uds}", secure=False)
        if self._health_server is not None:
            self.health_port = self._listen(
                self._health_server, f"{self.config.host}:{self.config.health_port}", secure=False
            )
        if self.config.metrics_port is not None:
            try:
                self._metrics_http, _ = start_http_server(
                    self.config.metrics_port, addr=self.config.metrics_host, registry=self.registry
                )
            except OSError as exc:
                raise OSError(
                    f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port}: {exc}"
                ) from exc
            self.metrics_port = self._metrics_http.server_address[1]
        self._server.start()
        if self._health_server is not None:
            self._health_server.start()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.store_error is None
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)
        if self.config.limits.session_ttl_s > 0:
            self._sweeper = threading.Thread(target=self._sweep, name="regulator-ttl", daemon=True)
            self._sweeper.start()
        return self

    def _sweep(self) -> None:
        """Expires idle sessions; the expiry is persisted like any other state change."""
        interval = min(max(self.config.limits.session_ttl_s / 4, 0.05), 30.0)
        while not self._stopped.wait(interval):
            try:
                self.manager.expire_idle()
            except Exception:  # never let the sweeper die silently
                log.exception("session expiry sweep failed")

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
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.manager.close_store()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> "RegulatorServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
