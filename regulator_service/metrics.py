"""Prometheus metrics of one server instance, in its own registry (no global state).

Regulator metrics share the prefix ``inforeg_regulator_``. Per job x modality series carry the
label ``job_id`` (``job`` belongs to Prometheus' scrape target), are capped at ``max_jobs``
exported jobs, and are removed when their session closes or is superseded. No rank or step label
ever: those are unbounded.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, TypeVar

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

from . import __version__
from .memory_budget import PARTS as MEMORY_PARTS
from .memory_budget import MemoryBudget
from .model import EpochSummary, Fallback, SessionConfig, SessionKey, SessionStatus, StepRecord
from .policy import Window, profile_name

PREFIX = "inforeg_regulator"
T = TypeVar("T")

# Latency buckets for sub-millisecond unary calls up to slow store writes.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class RegulatorMetrics:
    """Service and per-session metrics; implements ``observer.SessionObserver``."""

    def __init__(self, registry: CollectorRegistry | None = None, max_jobs: int = 100) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.max_jobs = max_jobs
        self._lock = threading.Lock()
        self._exported: dict[str, SessionKey] = {}  # job id -> attempt whose series are exported
        # Label children used on every Report, looked up once (a ``labels()`` call costs a few
        # microseconds, and a Report touched seven): per exported job its step, score and
        # proximal gauges (dropped with its series), per store operation its write histogram.
        self._step_children: dict[str, tuple[Any, tuple[Any, ...], tuple[Any, ...]]] = {}
        self._write_children: dict[str, tuple[Any, Any]] = {}
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
        labels = ["job_id", "modality"]
        self.fisher_trace = Gauge(
            f"{PREFIX}_fisher_trace",
            "Fisher-information trace Tr(F) of the last closed epoch.",
            labels,
            registry=r,
        )
        self.window_open = Gauge(
            f"{PREFIX}_window_open", "1 while the modality's prime learning window is open.", labels, registry=r
        )
        self.window_growth = Gauge(
            f"{PREFIX}_window_growth",
            "Growth statistic the current window was decided from (NaN when undefined).",
            labels,
            registry=r,
        )
        self.score = Gauge(
            f"{PREFIX}_score", "Last step's mean true-class probability (score_sum / count).", labels, registry=r
        )
        self.proximal = Gauge(
            f"{PREFIX}_proximal_coefficient", "Last step's proximal coefficient.", labels, registry=r
        )
        self.epoch = Gauge(f"{PREFIX}_epoch", "Epoch currently open.", ["job_id"], registry=r)
        self.step = Gauge(f"{PREFIX}_last_step", "Last step recorded.", ["job_id"], registry=r)
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

    def _exports(self, config: SessionConfig) -> bool:
        return self._exported.get(config.job_id) == config.key

    def session_opened(self, config: SessionConfig, window: tuple[Window, ...]) -> None:
        self.sessions_open.inc()
        self.sessions_opened.labels(profile_name(config.profile)).inc()
        with self._lock:
            current = self._exported.get(config.job_id)
            if current is None and len(self._exported) >= self.max_jobs:
                self.jobs_dropped.inc()
                self.job_cap_reached.set(1)
                return
            if current is not None:
                self._remove_series(config.job_id, config.modalities)
            self._exported[config.job_id] = config.key
            self.epoch.labels(config.job_id).set(0)
            self._set_window(config, window)

    def session_ended(self, config: SessionConfig, status: SessionStatus) -> None:
        self.sessions_open.dec()
        self.sessions_ended.labels(status.name.lower()).inc()
        with self._lock:
            if self._exports(config):
                self._remove_series(config.job_id, config.modalities)
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
        with self._lock:
            if not self._exports(config):
                return
            job = config.job_id
            children = self._step_children.get(job)
            if children is None:
                mods = config.modalities
                children = (
                    self.step.labels(job),
                    tuple(self.score.labels(job, m) for m in mods),
                    tuple(self.proximal.labels(job, m) for m in mods),
                )
                self._step_children[job] = children
            step, scores, proximal = children
            step.set(record.step)
            for gauge, s in zip(scores, record.score_sums):
                gauge.set(s / record.count)
            for gauge, p in zip(proximal, record.proximal):
                gauge.set(p)

    def epoch_closed(
        self, config: SessionConfig, closed: EpochSummary, next_window: tuple[Window, ...]
    ) -> None:
        self.epochs_closed.inc()
        with self._lock:
            if not self._exports(config):
                return
            job = config.job_id
            self.epoch.labels(job).set(closed.epoch + 1)
            for m, tr in zip(config.modalities, closed.fisher):
                self.fisher_trace.labels(job, m).set(tr)
            self._set_window(config, next_window)

    def report_rejected(self) -> None:
        self.reports.labels("rejected").inc()

    def _set_window(self, config: SessionConfig, window: tuple[Window, ...]) -> None:
        for m, w in zip(config.modalities, window):
            self.window_open.labels(config.job_id, m).set(1 if w.open else 0)
            self.window_growth.labels(config.job_id, m).set(w.growth)

    def _remove_series(self, job: str, modalities: tuple[str, ...]) -> None:
        self._step_children.pop(job, None)
        for gauge in (self.fisher_trace, self.window_open, self.window_growth, self.score, self.proximal):
            for m in modalities:
                try:
                    gauge.remove(job, m)
                except KeyError:
                    pass
        for gauge in (self.epoch, self.step):
            try:
                gauge.remove(job)
            except KeyError:
                pass


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
