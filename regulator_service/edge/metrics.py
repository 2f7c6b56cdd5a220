"""Prometheus metrics of one server instance, in its own registry (no global state).

Regulator metrics share the prefix ``inforeg_regulator_``. Per job x modality series carry the
label ``job_id`` (``job`` belongs to Prometheus' scrape target), are capped at ``max_jobs``
exported jobs, and go when their session closes or is superseded. No rank or step label ever:
those are unbounded.

The per-job series are read at scrape time from the open sessions (``JobSeriesCollector``,
client_python's custom-collector idiom), so a Report only counts itself: no gauge is set and no
lock of the metrics is taken on its path.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..capacity.memory_budget import PARTS as MEMORY_PARTS
from ..capacity.memory_budget import MemoryBudget
from ..model import EpochSummary, Fallback, SessionConfig, SessionKey, SessionStatus, StepRecord
from ..policy import Window, profile_name

PREFIX = "inforeg_regulator"
T = TypeVar("T")

# Latency buckets for sub-millisecond unary calls up to slow store writes.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class RegulatorMetrics:
    """Service and per-session metrics; implements ``observer.SessionObserver``."""

    def __init__(self, registry: CollectorRegistry | None = None, max_jobs: int = 100) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.max_jobs = max_jobs
        self._lock = threading.Lock()  # sessions opening and ending only, never a Report
        self._exported: dict[str, SessionKey] = {}  # job id -> attempt whose series are exported
        self._write_children: dict[str, tuple[Any, Any]] = {}  # per store operation, looked up once
        r = self.registry
        Info(f"{PREFIX}_build", "Regulator build information.", registry=r).info({"version": __version__})
        self.sessions_open = Gauge(f"{PREFIX}_sessions_open", "Sessions currently open.", registry=r)
        self.sessions_opened = Counter(
            f"{PREFIX}_sessions_opened_total", "Sessions created.", ["profile"], registry=r
        )
        self.sessions_ended = Counter(
            f"{PREFIX}_sessions_ended_total", "Sessions ended, by reason: closed, superseded, expired.", ["reason"], registry=r
        )
        self.reports = Counter(
            f"{PREFIX}_reports_total",
            "Report calls by outcome: recorded, duplicate (stored answer replayed) or rejected.",
            ["outcome"],
            registry=r,
        )
        # Per Report however it came (a unary call or one message of a stream): grpc_server_handling_seconds
        # holds one sample per RPC, so a ReportStream's is its whole lifetime, not a Report's latency.
        self.report_seconds = Histogram(
            f"{PREFIX}_report_seconds",
            "Latency of one Report, from its request to its answer or error, by how it came: rpc=Report (unary) or ReportStream (one stream message).",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fallback_steps = Counter(
            f"{PREFIX}_fallback_steps_total",
            "Steps that clients reported as applied without the regulator's answer.",
            ["mode"],
            registry=r,
        )
        self.epochs_closed = Counter(f"{PREFIX}_epochs_closed_total", "Epochs closed.", registry=r)
        self.store_write_seconds = Histogram(
            f"{PREFIX}_state_store_write_seconds",
            "Latency of durable state writes.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_write_failures = Counter(
            f"{PREFIX}_state_store_write_failures_total",
            "Durable state writes that failed.",
            ["operation"],
            registry=r,
        )
        self.store_healthy = Gauge(
            f"{PREFIX}_state_store_healthy", "1 when the state store is usable, else 0.", registry=r
        )
        self.jobs_dropped = Counter(
            f"{PREFIX}_metrics_jobs_dropped_total",
            "Sessions whose per-job series were not exported because of the job cap.",
            registry=r,
        )
        self.job_cap_reached = Gauge(
            f"{PREFIX}_metrics_job_cap_reached", "1 while the per-job series cap is reached.", registry=r
        )
        self.store_healthy.set(1)
        # Known label values start at zero, so increase() sees the first event and panels show 0.
        for outcome in ("recorded", "duplicate", "rejected"):
            self.reports.labels(outcome)
        for mode in ("neutral", "last"):
            self.fallback_steps.labels(mode)
        for reason in ("closed", "superseded", "expired"):
            self.sessions_ended.labels(reason)
        for op in ("create_session", "set_status", "append_step", "replace_step", "close_epoch"):
            self.store_write_failures.labels(op)
        self.report_timers = {rpc: self.report_seconds.labels(rpc) for rpc in ("Report", "ReportStream")}
        self._recorded = self.reports.labels("recorded")
        self._duplicate = self.reports.labels("duplicate")

    def track_memory(self, budget: "MemoryBudget") -> None:
        """Gauges of the server's memory budget, read at scrape time."""
        limit = Gauge(f"{PREFIX}_memory_budget_bytes", "The server's memory budget (--memory-budget).", registry=self.registry)
        limit.set(budget.limit)
        used = Gauge(
            f"{PREFIX}_memory_used_bytes",
            "Estimated bytes held against the memory budget, by part: sessions, answers (answer caches), history (encoded pages).",
            ["part"],
            registry=self.registry,
        )
        for part in MEMORY_PARTS:
            used.labels(part).set_function(lambda part=part: budget.used(part))

    # -- store instrumentation ----------------------------------------------------------------

    def timed_write(self, operation: str, fn: Callable[[], T]) -> T:
        children = self._write_children.get(operation)
        if children is None:  # operations are the store's method names: a fixed set
            children = (self.store_write_seconds.labels(operation), self.store_write_failures.labels(operation))
            self._write_children[operation] = children
        start = time.perf_counter()
        try:
            return fn()
        except Exception:
            children[1].inc()
            raise
        finally:
            children[0].observe(time.perf_counter() - start)

    # -- SessionObserver ----------------------------------------------------------------------

    def session_opened(self, config: SessionConfig, window: tuple[Window, ...]) -> None:
        self.sessions_open.inc()
        self.sessions_opened.labels(profile_name(config.profile)).inc()
        with self._lock:
            current = self._exported.get(config.job_id)
            if current is None and len(self._exported) >= self.max_jobs:
                self.jobs_dropped.inc()
                self.job_cap_reached.set(1)
                return
            self._exported[config.job_id] = config.key

    def session_ended(self, config: SessionConfig, status: SessionStatus) -> None:
        self.sessions_open.dec()
        self.sessions_ended.labels(status.name.lower()).inc()
        with self._lock:
            if self._exported.get(config.job_id) == config.key:
                del self._exported[config.job_id]
                if len(self._exported) < self.max_jobs:
                    self.job_cap_reached.set(0)

    def step_recorded(
        self, config: SessionConfig, record: StepRecord, window: tuple[Window, ...], duplicate: bool
    ) -> None:
        if duplicate:
            self._duplicate.inc()
            return
        self._recorded.inc()
        if record.fallback != Fallback.NONE:
            self.fallback_steps.labels(record.fallback.name.lower()).inc()

    def epoch_closed(
        self, config: SessionConfig, closed: EpochSummary, next_window: tuple[Window, ...]
    ) -> None:
        self.epochs_closed.inc()

    def report_rejected(self) -> None:
        self.reports.labels("rejected").inc()

    def track_sessions(self, sessions: Callable[[], Iterable["SeriesSource"]]) -> None:
        """The per-job series, read from ``sessions`` (the open ones) at every scrape."""
        self.registry.register(JobSeriesCollector(sessions, lambda: dict(self._exported)))


class SeriesSource(Protocol):
    """What the per-job series read of an open session (``core.session.Session``)."""

    config: SessionConfig

    def gauges(self) -> tuple[int, tuple[Window, ...], Optional[EpochSummary], Optional[StepRecord]]:
        """(open epoch, its windows, the last closed epoch, the last step's record)."""
        ...


# The per-job series, each declared once as an unregistered gauge (its name, help and labels):
# ``JobSeriesCollector`` computes their values from the open sessions at every scrape.
_BY_JOB = ["job_id"]
_BY_MODALITY = ["job_id", "modality"]
JOB_SERIES: tuple[tuple[Gauge, list[str]], ...] = (
    (Gauge(f"{PREFIX}_fisher_trace", "Fisher-information trace Tr(F) of the last closed epoch.", _BY_MODALITY, registry=None), _BY_MODALITY),
    (Gauge(f"{PREFIX}_window_open", "1 while the modality's prime learning window is open.", _BY_MODALITY, registry=None), _BY_MODALITY),
    (Gauge(f"{PREFIX}_window_growth", "Growth statistic the current window was decided from (NaN when undefined).", _BY_MODALITY, registry=None), _BY_MODALITY),
    (Gauge(f"{PREFIX}_score", "Last step's mean true-class probability (score_sum / count).", _BY_MODALITY, registry=None), _BY_MODALITY),
    (Gauge(f"{PREFIX}_proximal_coefficient", "Last step's proximal coefficient.", _BY_MODALITY, registry=None), _BY_MODALITY),
    (Gauge(f"{PREFIX}_epoch", "Epoch currently open.", _BY_JOB, registry=None), _BY_JOB),
    (Gauge(f"{PREFIX}_last_step", "Last step recorded.", _BY_JOB, registry=None), _BY_JOB),
)


class JobSeriesCollector(Collector):
    """Per job x modality gauges of the exported open sessions, computed when scraped."""

    def __init__(
        self, sessions: Callable[[], Iterable[SeriesSource]], exported: Callable[[], dict[str, SessionKey]]
    ) -> None:
        self._sessions = sessions
        self._exported = exported

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        out = []
        for gauge, labels in JOB_SERIES:
            meta = gauge.describe()[0]
            out.append(GaugeMetricFamily(meta.name, meta.documentation, labels=labels))
        return out

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        trace, window_open, growth, score, proximal, epoch, step = families
        exported = self._exported()
        for session in self._sessions():
            config = session.config
            job = config.job_id
            if exported.get(job) != config.key:
                continue
            open_epoch, windows, closed, last = session.gauges()
            epoch.add_metric([job], open_epoch)
            for i, m in enumerate(config.modalities):
                window_open.add_metric([job, m], 1 if windows[i].open else 0)
                growth.add_metric([job, m], windows[i].growth)
                if closed is not None:
                    trace.add_metric([job, m], closed.fisher[i])
                if last is not None:
                    score.add_metric([job, m], last.score_sums[i] / last.count)
                    proximal.add_metric([job, m], last.proximal[i])
            if last is not None:
                step.add_metric([job], last.step)
        yield from families


def add_runtime_collectors(registry: CollectorRegistry) -> None:
    """The standard ``process_*`` (memory, CPU, file descriptors), ``python_gc_*`` and
    ``python_info`` series of the server process, on its own registry (not the global one)."""
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)


UNKNOWN_METHOD = "unknown"


class GrpcServerMetrics:
    """The go-grpc-prometheus server metrics, fed by ``interceptors.MetricsInterceptor``.

    ``grpc_service``/``grpc_method`` come from a fixed set (the methods the server registers,
    else ``unknown``): a caller can never create series by calling made-up method names."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry  # where the tenants' series go too (tenant_access.TenantMetrics)
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started_total", "Total number of RPCs started on the server.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            labels,
            registry=registry,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            labels,
            registry=registry,
        )
