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

from .api import RegulatorAPI
from .interceptors import MetricsInterceptor
from .manager import Limits, SessionManager
from .metrics import GrpcServerMetrics, RegulatorMetrics
from .servicer import RegulatorServicer
from .storage import MemoryStore, SQLiteStore, StateStore
from .storage.instrumented import InstrumentedStore

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Regulator"].full_name


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = pick a free port
    metrics_host: str = "127.0.0.1"
    metrics_port: Optional[int] = None  # None = no metrics endpoint; 0 = free port
    state_dir: Optional[Path] = None  # None = in memory only
    max_workers: int = 16
    max_receive_bytes: int = 1 << 20
    grace_seconds: float = 10.0
    limits: Limits = field(default_factory=Limits)
    metrics_max_jobs: int = 100


class RegulatorServer:
    """One regulator instance. ``start()`` binds and serves; ``stop()`` drains and flushes."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = RegulatorMetrics(self.registry, max_jobs=config.metrics_max_jobs)
        self.grpc_metrics = GrpcServerMetrics(self.registry)
        inner: StateStore = SQLiteStore(config.state_dir) if config.state_dir else MemoryStore()
        self.store = InstrumentedStore(inner, self.metrics.timed_write)
        self.manager = SessionManager(self.store, self.metrics, limits=config.limits)
        self.api = RegulatorAPI(self.manager)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="regulator-rpc"),
            interceptors=[MetricsInterceptor(self.grpc_metrics)],
            options=[
                ("grpc.so_reuseport", 0),  # a port clash must be an error, not a silent second server
                ("grpc.max_receive_message_length", config.max_receive_bytes),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        pb_grpc.add_RegulatorServicer_to_server(RegulatorServicer(self.api, self.metrics), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self._metrics_http = None
        self._stopped = threading.Event()

    def start(self) -> "RegulatorServer":
        restored = self.manager.restore()
        if restored:
            log.info("restored %d open session(s) from %s", restored, self.config.state_dir)
        address = f"{self.config.host}:{self.config.port}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from exc
        if self.config.metrics_port is not None:
            self._metrics_http, _ = start_http_server(
                self.config.metrics_port, addr=self.config.metrics_host, registry=self.registry
            )
            self.metrics_port = self._metrics_http.server_address[1]
        self._server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self

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
