"""The server's parts, each built by one small function: metrics, the store, the gRPC server.

``RegulatorServer`` (``server.py``) calls them in order and owns starting and stopping what they
built; the shape of optuna's ``make_server``. ``ServerConfig`` is everything they are built from.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, Gauge

from inforeg.regulator.v1 import regulator_pb2 as pb

from ..core.ownership import DEFAULT_LEASE_TTL_S, Ownership, replica_ownership
from ..model import Limits
from ..policy import BUILTIN_PROFILES, ProfileRegistry
from ..storage import MemoryStore, SQLiteStore, StateStore, StoreError
from ..storage.instrumented import InstrumentedStore
from ..storage.lockfile import StateDirLock
from .admission import (
    CORE_BACKLOG_LIMIT,
    DEFAULT_MAX_STREAMS,
    AdmissionInterceptor,
    AdmissionPool,
    core_backlog_options,
)
from .interceptors import DelayInterceptor, MalformedRequestInterceptor, MetricsInterceptor, method_paths
from .metrics import PREFIX, GrpcServerMetrics, RegulatorMetrics, add_runtime_collectors
from .security import BearerTokenInterceptor, TlsFiles, TokenSource
from .servicer import RegulatorServicer
from .tenant_access import TenantInterceptor, TenantMetrics
from .tenants import Tenants
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
# RPCs admitted at once (running + queued for a worker); beyond it the regulator answers
# RESOURCE_EXHAUSTED with RETRY_AFTER_KEY at once instead of queueing without bound. 8 per worker thread of the
# default 16: a burst of 128 DDP ranks reporting the same step is admitted whole.
DEFAULT_MAX_CONCURRENT_RPCS = 128


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
    state_dir: Optional[Path] = None  # None = in memory only (or store_dsn)
    store_dsn: Optional[str] = None  # PostgreSQL (postgresql://...) instead of state_dir
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S  # PostgreSQL: a job's lease (several replicas, core/ownership.py)
    max_workers: int = 16
    max_concurrent_rpcs: Optional[int] = DEFAULT_MAX_CONCURRENT_RPCS  # None = unbounded
    max_streams: int = DEFAULT_MAX_STREAMS  # open Report streams, each on a thread of its own; 0 = refused
    max_pending_calls: int = CORE_BACKLOG_LIMIT  # calls grpc core queues before admission sees them
    max_receive_bytes: int = 1 << 20
    grace_seconds: float = 10.0
    limits: Limits = field(default_factory=Limits)
    profiles: ProfileRegistry = BUILTIN_PROFILES  # built-ins plus the --plugin profiles
    metrics_max_jobs: int = 100
    token: Optional[TokenSource] = None  # bearer token required on Regulator RPCs
    tenants: Optional[Tenants] = None  # --tenants: callers' identities and their jobs (instead of token)
    tls: Optional[TlsFiles] = None
    debug_delay_s: float = 0.0  # fault injection: every Regulator RPC sleeps this long first
    debug_hold_file: Optional[str] = None  # fault injection: every Regulator RPC waits while this file exists
    debug_max_state_bytes: Optional[int] = None  # fault injection: the state file stops growing here (disk full)


def make_metrics(max_jobs: int) -> tuple[CollectorRegistry, RegulatorMetrics, GrpcServerMetrics]:
    """The server's own registry (no global state) with the process, regulator and gRPC metrics."""
    registry = CollectorRegistry()
    add_runtime_collectors(registry)
    return registry, RegulatorMetrics(registry, max_jobs=max_jobs), GrpcServerMetrics(registry)


@dataclass(frozen=True)
class OpenedStore:
    store: StateStore  # instrumented: every write is timed for the metrics
    error: Optional[str]  # why the state file is unusable (the store is then an empty one in memory)
    lock: Optional[StateDirLock]  # the state directory's lock, held for the server's lifetime
    ownership: Optional[Ownership] = None  # PostgreSQL: this replica's leases (its writes are fenced)


def open_store(config: ServerConfig, metrics: RegulatorMetrics) -> OpenedStore:
    """The state store: PostgreSQL at ``store_dsn`` (raises ``StoreError`` when it cannot be
    reached), SQLite under ``state_dir`` (its directory locked first: a second server
    stops here, ``StateDirLocked``), else in memory. A state file that cannot be used is not
    raised but returned as ``error``: the server then serves health, metrics and UNAVAILABLE."""
    inner: StateStore = MemoryStore()
    lock: Optional[StateDirLock] = None
    error: Optional[str] = None
    ownership: Optional[Ownership] = None
    if config.store_dsn:  # unreachable or a newer schema: StoreError, one line (a restart may cure it)
        from ..storage.postgresql import PostgreSQLStore

        # several replicas may share the database: a job is served under its lease, and every
        # write of it is fenced by the lease's token in the database (core/ownership.py)
        leases = replica_ownership(config.store_dsn, config.lease_ttl_s, config.limits.store_timeout_s)
        inner = PostgreSQLStore(
            config.store_dsn, profiles=config.profiles, timeout_s=config.limits.store_timeout_s,
            guard=lambda key: leases.fence(key.job_id),
        )
        leases.start()
        ownership = leases
    elif config.state_dir is not None:
        lock = StateDirLock.acquire(config.state_dir)
        try:
            inner = SQLiteStore(
                config.state_dir,
                profiles=config.profiles,
                lock=lock,
                timeout_s=config.limits.store_timeout_s,
                max_bytes=config.debug_max_state_bytes,
            )
        except StoreError as exc:
            error = str(exc)
            log.error("state store unusable, serving UNAVAILABLE until fixed: %s", exc)
            metrics.store_healthy.set(0)
    return OpenedStore(InstrumentedStore(inner, metrics.timed_write), error, lock, ownership)


def make_interceptors(
    config: ServerConfig,
    grpc_metrics: GrpcServerMetrics,
    pool: Optional[AdmissionPool] = None,
    tenant_metrics: Optional[TenantMetrics] = None,
) -> list[grpc.ServerInterceptor]:
    """Admission outermost (a shed call costs nothing more), then metrics (refused calls are
    counted, under bounded labels), then the token or the tenants, then decoding: an
    unauthenticated request is never deserialized."""
    interceptors: list[grpc.ServerInterceptor] = [AdmissionInterceptor(pool)] if pool is not None else []
    counting = MetricsInterceptor(grpc_metrics, REGISTERED_METHODS, pool.handler_started if pool is not None else None)
    if pool is not None:  # shed calls, and calls gone before a worker took them, are counted too
        pool.count_unhandled = counting.count_unhandled
    interceptors.append(counting)
    if config.tenants is not None:
        if config.token is not None:
            raise ValueError("--tenants replaces the single bearer token (--token-file, REGULATOR_TOKEN): give one of them")
        interceptors.append(TenantInterceptor(config.tenants, tenant_metrics))
    elif config.token is not None:
        interceptors.append(BearerTokenInterceptor(config.token))
    interceptors.append(MalformedRequestInterceptor())
    if config.debug_delay_s > 0 or config.debug_hold_file:
        interceptors.append(DelayInterceptor(config.debug_delay_s, SERVICE_NAME, config.debug_hold_file))
    return interceptors


def make_grpc_server(
    config: ServerConfig,
    servicer: RegulatorServicer,
    grpc_metrics: GrpcServerMetrics,
    health_servicer: health.HealthServicer,
    open_sessions: Callable[[], Iterable[Any]] = tuple,
) -> grpc.Server:
    """The main gRPC server (not bound yet): the Regulator service, health and reflection;
    ``open_sessions`` feeds the per-tenant gauge (``--tenants``)."""
    # The regulator admits calls itself (edge/admission.py) so that a shed answer carries the
    # structural "retry later" (RETRY_AFTER_KEY), which grpcio's maximum_concurrent_rpcs cannot.
    # Streams run on max_streams threads of their own beside max_workers (edge/admission.py).
    pool = AdmissionPool(config.max_workers, config.max_concurrent_rpcs, max_streams=config.max_streams)
    Gauge(
        f"{PREFIX}_report_streams_open",
        "Report streams open now (ReportStream; at most --max-streams).",
        registry=grpc_metrics.registry,
    ).set_function(lambda: pool.streams_open)
    tenant_metrics = (
        TenantMetrics(grpc_metrics.registry, config.tenants, open_sessions)
        if config.tenants is not None
        else None
    )
    server = grpc.server(
        pool,
        interceptors=make_interceptors(config, grpc_metrics, pool, tenant_metrics),
        options=[
            ("grpc.so_reuseport", 0),  # a port clash must be an error, not a silent second server
            ("grpc.max_receive_message_length", config.max_receive_bytes),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            *core_backlog_options(config.max_pending_calls),  # a burst reaches admission, not cancelled in core
        ],
    )
    add_regulator_servicer(servicer, server)  # GetSession answers pre-encoded bytes
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return server


def make_health_server(health_servicer: health.HealthServicer) -> grpc.Server:
    """A server of its own for the health port: probes are answered even while the main port
    sheds load."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="regulator-health"),
        options=[("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=16,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server
