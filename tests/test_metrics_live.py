"""The metrics a real regulator exports while real jobs run through it over gRPC, scraped from
its /metrics endpoint, and the PromQL of deploy/ (Grafana dashboard, alerts) checked against
them.

One scenario (module fixture), several jobs on one in-thread server with a job cap of 2:

- ``trace``: the shipped pix+mor statistics trace, replayed under the ``official`` profile
  through ``RegulatorClient``, one EndEpoch at a time, until its window closes (the reference
  modality's trace stops growing by more than 5%); plus a duplicate, a rejected (NaN) and a
  fallback report;
- ``digits``: a short real training job (``trainers.digits.train``, 3 epochs, ``official``),
  scraped after every epoch;
- ``capped``: opened while the other two are exported, so the per-job series cap is reached.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import regulator_service
from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.trace import TraceEpochEnd, TraceStep, read_trace
from regulator_service.edge import metrics as metrics_module
from regulator_service.edge.interceptors import GO_CODE_NAMES
from regulator_service.edge.server import RegulatorServer, ServerConfig

from .conftest import data_file, require_promtool, roomy_limits, wait_until

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "inforeg-regulator.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

TRACE_JOB = "trace-pix-mor"
DIGITS_JOB = "digits-live"
CAPPED_JOB = "capped"
DIGITS_EPOCHS = 3
PER_JOB = ("fisher_trace", "window_open", "window_growth", "score", "proximal_coefficient")
# Series that exist for any scrape target without the target exporting them.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added", "scrape_samples_post_metric_relabeling"}
# Series of kube-state-metrics (kube-prometheus-stack runs it): the not-scraped alert asks it
# whether a regulator container exists at all.
KUBE_STATE = {"kube_pod_container_info", "kube_pod_init_container_info"}
# Added by Prometheus from the scrape target (namespace and pod by Kubernetes service discovery).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}


# -- scraping -----------------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        assert resp.status == 200
        return resp.read().decode()


@dataclass
class Scrape:
    text: str
    samples: list[tuple[str, dict[str, str], float]] = field(init=False)
    types: dict[str, str] = field(init=False)  # name on the # TYPE line -> type

    def __post_init__(self) -> None:
        self.samples = [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(self.text) for s in fam.samples]
        self.types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", self.text, re.M))

    def get(self, name: str, **labels: str) -> Optional[float]:
        hits = [v for n, lab, v in self.samples if n == name and lab == labels]
        assert len(hits) <= 1
        return hits[0] if hits else None

    def value(self, name: str, **labels: str) -> float:
        v = self.get(name, **labels)
        assert v is not None, f"{name}{labels} not exported"
        return v

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(lab, v) for n, lab, v in self.samples if n == name]

    def job_series(self, job_id: str) -> list[str]:
        return [f"{n}{lab}" for n, lab, _ in self.samples if lab.get("job_id") == job_id]

    def sample_names(self) -> set[str]:
        """Every series name a PromQL query can select from this exposition."""
        names = {n for n, _, _ in self.samples}
        for name, kind in self.types.items():
            # A histogram's own name selects nothing: only its _bucket/_sum/_count series exist.
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {f"{name}_sum", f"{name}_count"}
            else:  # counters are declared with their _total name, info metrics with _info
                names.add(name)
        return names

    def label_names(self, name: str) -> set[str]:
        return {k for n, lab, _ in self.samples if n == name for k in lab}


@dataclass
class Run:
    scrapes: dict[str, Scrape] = field(default_factory=dict)
    windows: list[tuple[int, dict[str, float], dict[str, bool], float]] = field(default_factory=list)  # epoch, gauge, API, epoch gauge
    digits_epochs: list[Scrape] = field(default_factory=list)
    trace_steps: int = 0
    trace_epochs: int = 0
    digits_result: dict[str, Any] = field(default_factory=dict)
    capped_scrape: Optional[Scrape] = None


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    torch = pytest.importorskip("torch", reason="the digits trainer needs torch")
    from trainers.digits import TrainConfig, train

    torch.set_num_threads(1)
    state = tmp_path_factory.mktemp("metrics-live") / "state"
    run = Run()
    srv = RegulatorServer(ServerConfig(port=0, metrics_port=0, state_dir=state, grace_seconds=1.0, metrics_max_jobs=2, limits=roomy_limits()))
    srv.start()
    try:
        assert srv.metrics_port
        snap = lambda: Scrape(scrape(srv.metrics_port))  # noqa: E731
        run.scrapes["idle"] = snap()
        with RegulatorClient.connect(srv.target, timeout=10.0) as client:
            _trace_job(client, snap, run)
            run.scrapes["trace_closed_window"] = snap()
            run.digits_result = _digits_job(client, snap, run, train, TrainConfig)
            run.scrapes["after_digits"] = snap()
            client.close_session(TRACE_JOB, attempt=0)
            run.scrapes["after_trace_close"] = snap()
            client.close_session(CAPPED_JOB, attempt=0)
            run.scrapes["final"] = snap()
    finally:
        srv.stop(grace=0)
    yield run


def _trace_job(client: RegulatorClient, snap: Any, run: Run) -> None:
    header, events = read_trace(data_file("trace_pix+mor_seed0.jsonl"))
    mods = header.modalities
    client.open_session(TRACE_JOB, mods, "official", reference_modality=header.reference_modality)
    run.scrapes["trace_opened"] = snap()
    last: Optional[TraceStep] = None
    for ev in events:
        if isinstance(ev, TraceEpochEnd):
            resp = client.end_epoch(TRACE_JOB, attempt=0, epoch=ev.epoch)
            s = snap()
            gauge = {m: s.value("inforeg_regulator_window_open", job_id=TRACE_JOB, modality=m) for m in mods}
            api = {w.modality: w.open for w in resp.next_window}
            run.windows.append((ev.epoch, gauge, api, s.value("inforeg_regulator_epoch", job_id=TRACE_JOB)))
            run.trace_epochs += 1
            if not any(api.values()) or ev.epoch >= 20:
                break
            continue
        report = dict(attempt=0, epoch=ev.epoch, step=ev.step, count=ev.count, score_sums=ev.score_sum, fisher=ev.fisher)
        client.report(TRACE_JOB, **report)
        run.trace_steps += 1
        last = ev
        if run.trace_steps == 1:
            run.scrapes["trace_first_step"] = snap()
            client.report(TRACE_JOB, **report)  # a retried report: the stored answer, counted once
            bad = dict(report, step=ev.step + 1, score_sums={m: float("nan") for m in mods})
            with pytest.raises(Exception, match="(?i)nan|finite|invalid"):
                client.report(TRACE_JOB, **bad)
    assert last is not None
    # A step the client applied without the regulator's answer (zero coefficients).
    client.report(
        TRACE_JOB, attempt=0, epoch=last.epoch + 1, step=last.step + 1, count=last.count,
        score_sums=last.score_sum, fisher=last.fisher, fallback=pb.FALLBACK_NEUTRAL,
    )
    run.trace_steps += 1


def _digits_job(client: RegulatorClient, snap: Any, run: Run, train: Any, TrainConfig: Any) -> dict[str, Any]:
    def log(epoch: int, end: Any) -> None:
        run.digits_epochs.append(snap())
        if epoch == 0:  # both jobs exported: a third one hits the cap of 2
            client.open_session(CAPPED_JOB, ["a", "b"], "none")
            run.capped_scrape = snap()

    return train(TrainConfig(epochs=DIGITS_EPOCHS, profile="official", job_id=DIGITS_JOB, seed=0), client, log=log)


# -- the metrics of metrics.py -------------------------------------------------------------------


def documented_metrics() -> dict[str, str]:
    """Exposition name (as on its # TYPE line) -> kind, for every metric metrics.py declares."""
    source = Path(metrics_module.__file__).read_text()
    out = {}
    for kind, name in re.findall(r"\b(Info|Gauge|Counter|Histogram|Summary)\(\s*f?\"([^\"]+)\"", source):
        name = name.replace("{PREFIX}", metrics_module.PREFIX)
        if kind == "Info":
            name += "_info"
        out[name] = kind
    assert len(out) >= 20, f"metrics.py parsing found only {sorted(out)}"
    return out


def test_every_documented_metric_is_exported(live: Run) -> None:
    for when in ("idle", "final", "trace_closed_window"):
        types = live.scrapes[when].types
        missing = sorted(set(documented_metrics()) - set(types))
        assert not missing, f"{when}: not in the exposition: {missing}"
    # Per-job series exist while a job is open.
    mid = live.digits_epochs[-1]
    for short in PER_JOB:
        for job in (TRACE_JOB, DIGITS_JOB):
            assert mid.series(f"inforeg_regulator_{short}"), short
            assert any(lab["job_id"] == job for lab, _ in mid.series(f"inforeg_regulator_{short}")), (short, job)


def _finite(v: float) -> bool:
    return not math.isnan(v) and not math.isinf(v)


def _check_sane(s: Scrape, where: str) -> None:
    kinds = documented_metrics()
    for name, labels, v in s.samples:
        ctx = f"{where}: {name}{labels} = {v}"
        if name.endswith("_created"):
            continue
        if name == "inforeg_regulator_window_growth":
            assert _finite(v) or math.isnan(v), ctx  # NaN: undefined growth (documented)
            continue
        assert _finite(v), ctx
        if name.endswith(("_total", "_count", "_sum", "_bucket")):
            assert v >= 0, ctx
        if name in ("inforeg_regulator_window_open", "inforeg_regulator_state_store_healthy", "inforeg_regulator_metrics_job_cap_reached"):
            assert v in (0.0, 1.0), ctx
        if name == "inforeg_regulator_score":
            assert 0.0 <= v <= 1.0, ctx
        if name in ("inforeg_regulator_proximal_coefficient", "inforeg_regulator_fisher_trace"):
            assert v >= 0.0, ctx
        if name in ("inforeg_regulator_epoch", "inforeg_regulator_last_step", "inforeg_regulator_sessions_open") or (
            name.endswith("_total") and name != "process_cpu_seconds_total"  # the only counter of seconds
        ):
            assert v == int(v) and v >= 0, ctx
    assert s.value("inforeg_regulator_state_store_healthy") == 1
    assert s.value("inforeg_regulator_build_info", version=regulator_service.__version__) == 1
    # Histograms: cumulative buckets ending in +Inf == _count.
    for name, kind in kinds.items():
        if kind != "Histogram":
            continue
        for labels, count in s.series(f"{name}_count"):
            buckets = sorted(
                ((float(lab["le"]), v) for lab, v in s.series(f"{name}_bucket") if {k: x for k, x in lab.items() if k != "le"} == labels),
            )
            counts = [v for _, v in buckets]
            assert counts == sorted(counts) and buckets[-1] == (math.inf, count), f"{where}: {name}{labels}"
            assert s.value(f"{name}_sum", **labels) >= 0


# The standard collectors of prometheus_client, on the server's own registry.
RUNTIME_METRICS = ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
                   "python_gc_objects_collected_total", "python_gc_collections_total", "python_info")


def test_process_and_gc_collectors_are_exported(live: Run) -> None:
    s = live.scrapes["final"]
    for name in RUNTIME_METRICS:
        assert s.series(name), f"{name} is not exported"
    assert s.value("process_resident_memory_bytes") > 0
    assert {lab["generation"] for lab, _ in s.series("python_gc_collections_total")} == {"0", "1", "2"}


def test_values_are_sane(live: Run) -> None:
    for when, s in live.scrapes.items():
        _check_sane(s, when)
    for i, s in enumerate(live.digits_epochs):
        _check_sane(s, f"digits epoch {i}")


def test_counters_add_up(live: Run) -> None:
    s = live.scrapes["final"]
    steps_per_epoch = -(-len(_digits_train_labels()) // 64)
    digits_steps = DIGITS_EPOCHS * steps_per_epoch
    assert s.value("inforeg_regulator_reports_total", outcome="recorded") == live.trace_steps + digits_steps
    assert s.value("inforeg_regulator_reports_total", outcome="duplicate") == 1
    assert s.value("inforeg_regulator_reports_total", outcome="rejected") == 1
    assert s.value("inforeg_regulator_fallback_steps_total", mode="neutral") == 1
    assert s.value("inforeg_regulator_epochs_closed_total") == live.trace_epochs + DIGITS_EPOCHS
    assert s.value("inforeg_regulator_sessions_opened_total", profile="official") == 2
    assert s.value("inforeg_regulator_sessions_opened_total", profile="none") == 1
    assert s.value("inforeg_regulator_sessions_ended_total", reason="closed") == 3
    assert s.value("inforeg_regulator_sessions_open") == 0
    assert s.value("inforeg_regulator_metrics_jobs_dropped_total") == 1
    # The gRPC metrics agree with the regulator's own accounting. The client sends its Reports as
    # unary calls or (the default) as the messages of a stream per job: count both ways.
    svc = "inforeg.regulator.v1.Regulator"
    reports = live.trace_steps + digits_steps + 2  # + the duplicate and the rejected one
    unary = dict(grpc_type="unary", grpc_service=svc, grpc_method="Report")
    stream = dict(grpc_type="bidi_stream", grpc_service=svc, grpc_method="ReportStream")

    def both(name: str, **labels: str) -> float:
        return (s.get(name, **unary, **labels) or 0.0) + (s.get(name, **stream, **labels) or 0.0)

    assert both("grpc_server_msg_received_total") == reports
    assert both("grpc_server_msg_sent_total") == reports - 1  # the rejected one has no answer
    assert (s.get("grpc_server_started_total", **unary) or 0.0) == (s.get("grpc_server_handling_seconds_count", **unary) or 0.0)
    # The regulator's own per-Report histogram sees every Report, however it came.
    timed = {lab["rpc"]: v for lab, v in s.series("inforeg_regulator_report_seconds_count")}
    assert set(timed) == {"Report", "ReportStream"} and sum(timed.values()) == reports, timed
    assert timed["Report"] == (s.get("grpc_server_msg_received_total", **unary) or 0.0)
    assert timed["ReportStream"] == (s.get("grpc_server_msg_received_total", **stream) or 0.0)
    # The rejected Report ended its call (a unary one, or the stream that carried it) InvalidArgument.
    assert both("grpc_server_handled_total", grpc_code="InvalidArgument") == 1
    for op in ("create_session", "append_step", "close_epoch"):
        assert s.value("inforeg_regulator_state_store_write_seconds_count", operation=op) > 0, op


def _digits_train_labels() -> Any:
    from trainers.digits_data import load_split

    return load_split(("fac", "zer")).y_train


# -- the window gauge and the per-job series ----------------------------------------------------


def test_window_gauge_flips_from_open_to_closed(live: Run) -> None:
    assert live.scrapes["trace_opened"].value("inforeg_regulator_window_open", job_id=TRACE_JOB, modality="pix") == 1
    states = []
    for epoch, gauge, api, epoch_gauge in live.windows:
        assert gauge == {m: float(o) for m, o in api.items()}, f"epoch {epoch}: gauge {gauge} vs EndEpoch {api}"
        assert epoch_gauge == epoch + 1
        states.append(gauge["pix"])
    # Open at the start by construction of the official profile, closed once the trace flattens.
    assert states[0] == 1 and states[-1] == 0, states
    assert states == sorted(states, reverse=True), f"one flip, 1 -> 0: {states}"
    assert len(states) >= 3
    closed = live.scrapes["trace_closed_window"]
    assert closed.value("inforeg_regulator_window_open", job_id=TRACE_JOB, modality="mor") == 0
    # A regulated step while the window was open, none after it closed.
    first = live.scrapes["trace_first_step"]
    assert max(first.value("inforeg_regulator_proximal_coefficient", job_id=TRACE_JOB, modality=m) for m in ("pix", "mor")) > 0
    assert first.get("inforeg_regulator_fisher_trace", job_id=TRACE_JOB, modality="pix") is None  # no closed epoch yet
    assert closed.value("inforeg_regulator_fisher_trace", job_id=TRACE_JOB, modality="pix") > 0


def test_real_training_job_is_visible_while_it_runs(live: Run) -> None:
    assert len(live.digits_epochs) == DIGITS_EPOCHS
    for epoch, s in enumerate(live.digits_epochs):
        assert s.value("inforeg_regulator_epoch", job_id=DIGITS_JOB) == epoch + 1
        assert s.value("inforeg_regulator_last_step", job_id=DIGITS_JOB) > 0
        for m in ("fac", "zer"):
            assert s.value("inforeg_regulator_fisher_trace", job_id=DIGITS_JOB, modality=m) > 0
            # official: open for the first epochs by construction (ten zeros of history).
            assert s.value("inforeg_regulator_window_open", job_id=DIGITS_JOB, modality=m) == 1
            assert 0 < s.value("inforeg_regulator_score", job_id=DIGITS_JOB, modality=m) <= 1
    assert live.digits_result["window_open_epochs"] == {"fac": DIGITS_EPOCHS, "zer": DIGITS_EPOCHS}


def test_job_cap_and_series_removed_on_close(live: Run) -> None:
    capped = live.capped_scrape
    assert capped is not None
    assert capped.value("inforeg_regulator_metrics_job_cap_reached") == 1
    assert capped.value("inforeg_regulator_metrics_jobs_dropped_total") == 1
    assert capped.job_series(CAPPED_JOB) == []
    assert capped.value("inforeg_regulator_sessions_open") == 3
    after_digits = live.scrapes["after_digits"]
    assert after_digits.job_series(DIGITS_JOB) == [], "the trainer closed its session: its series must go"
    assert after_digits.job_series(TRACE_JOB), "the other job keeps its series"
    assert after_digits.value("inforeg_regulator_metrics_job_cap_reached") == 0
    after_trace = live.scrapes["after_trace_close"]
    assert after_trace.job_series(TRACE_JOB) == []
    assert not any("job_id" in lab for _, lab, _ in after_trace.samples), "no per-job series left"
    assert after_trace.value("inforeg_regulator_sessions_open") == 1


# -- promtool on the real exposition ------------------------------------------------------------


def _promtool() -> str:
    return require_promtool()


@pytest.mark.parametrize("when", ["capped", "trace_closed_window", "final"])
def test_promtool_check_metrics(live: Run, when: str) -> None:
    s = live.capped_scrape if when == "capped" else live.scrapes[when]
    assert s is not None
    proc = subprocess.run([_promtool(), "check", "metrics"], input=s.text, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


# -- the PromQL of the dashboard and the alerts -------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def promql_selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(metric name, {label: (op, value)}) of every vector selector in a PromQL expression."""
    braces: list[str] = []

    def keep(m: re.Match[str]) -> str:
        braces.append(m.group(0))
        return f"{{{len(braces) - 1}}}"

    s = re.sub(r"\{[^}]*\}", keep, expr)  # label matchers, set aside
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', s)  # string arguments
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery brackets
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\boffset\s+-?[\w$]+", " ", s)
    found = []
    used = set()
    for m in re.finditer(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)\s*(?:\{(\d+)\})?", s):
        name, brace = m.group(1), m.group(2)
        if brace is None and (s[m.end():].lstrip().startswith("(") or name.lower() in _KEYWORDS):
            continue  # a function, an aggregation or a keyword
        labels = {}
        if brace is not None:
            used.add(int(brace))
            labels = {k: (op, v) for k, op, v in _MATCHER.findall(braces[int(brace)])}
        found.append((name, labels))
    assert used == set(range(len(braces))), f"a selector without a metric name in {expr}"
    return found


def test_promql_parser_on_known_expressions() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket{job="x", instance=~"$instance"}[$__rate_interval]))) > 1e-3'
    assert promql_selectors(expr) == [("grpc_server_handling_seconds_bucket", {"job": ("=", "x"), "instance": ("=~", "$instance")})]
    expr = "a_total unless a_total offset 5m or on(job) vector(0) and bool b"
    assert [n for n, _ in promql_selectors(expr)] == ["a_total", "a_total", "b"]
    expr = 'label_replace(up{job="a"}, "dst", "$1", "src", "(.*)") * on (instance) group_left (version) info_metric'
    assert promql_selectors(expr) == [("up", {"job": ("=", "a")}), ("info_metric", {})]
    with pytest.raises(AssertionError, match="without a metric name"):
        promql_selectors('sum({__name__=~"x.*"})')


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", query)
        assert m, f"variable {var['name']}: unexpected query {query}"
        out.append((f"variable {var['name']}", m.group(1)))
    return out


def alert_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(f"alert {r.get('alert') or r.get('record')}", r["expr"]) for g in groups for r in g["rules"]]


def test_dashboard_and_alerts_use_only_exported_metrics(live: Run) -> None:
    # The union of scrapes: per-job series exist only while a job is open.
    scrapes = [*live.scrapes.values(), *live.digits_epochs]
    exported = set().union(*(s.sample_names() for s in scrapes))
    labels: dict[str, set[str]] = {}
    for s in scrapes:
        for name in exported:
            labels.setdefault(name, set()).update(s.label_names(name))
    # grpc_code values are spelled as go-grpc-prometheus spells them (InvalidArgument, Canceled),
    # and the queries must use that spelling too.
    codes = {lab["grpc_code"] for s in scrapes for lab, _ in s.series("grpc_server_handled_total")}
    assert "OK" in codes and len(codes) >= 2, codes
    spelled = set(GO_CODE_NAMES.values())
    assert "InvalidArgument" in spelled and "Canceled" in spelled
    assert codes <= spelled, codes
    queries = dashboard_queries() + alert_queries()
    assert len(queries) > 20
    used = set()
    for where, expr in queries:
        selectors = promql_selectors(expr)
        assert selectors, f"{where}: no metric in {expr}"
        for name, matchers in selectors:
            used.add(name)
            if name in SYNTHETIC or name in KUBE_STATE:
                continue
            assert name in exported, f"{where}: {name} is not exported by the regulator ({expr})"
            for label, (op, value) in matchers.items():
                if label in TARGET_LABELS or not labels.get(name):
                    continue  # added by Prometheus; or a family without samples yet (no label set to compare)
                assert label in labels[name], f"{where}: {name} has no label {label!r} (it has {sorted(labels[name])})"
                if label == "grpc_code":
                    for code in value.split("|"):
                        assert code in spelled, f"{where}: grpc_code {code!r} is not a status code as the server names them"
    # The dashboard shows every regulator metric.
    dashboard_used = {n for where, expr in dashboard_queries() for n, _ in promql_selectors(expr)}
    for name, kind in documented_metrics().items():
        if not name.startswith(metrics_module.PREFIX):
            continue
        shown = {name} | ({f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "Histogram" else set())
        assert shown & dashboard_used, f"{name} is on no dashboard panel"


# -- Reports on a stream and unary: the per-Report histogram and the latency panels ----------------


def _matches(labels: dict[str, str], matchers: dict[str, tuple[str, str]]) -> bool:
    """Whether a series' labels satisfy a selector's matchers (target labels: Grafana variables, All)."""
    for label, (op, value) in matchers.items():
        if label in TARGET_LABELS:
            continue
        have = labels.get(label, "")
        hit = re.fullmatch(value, have) is not None if op in ("=~", "!~") else have == value
        if hit != (op in ("=", "=~")):
            return False
    return True


@pytest.mark.e2e
def test_streamed_and_unary_reports_are_each_timed_and_counted(tmp_path: Path) -> None:
    """Every Report is one sample of inforeg_regulator_report_seconds and one count of
    reports_total by outcome, whether unary or a stream message; a ReportStream's
    grpc_server_handling_seconds (the stream's lifetime) is on no latency panel."""
    srv = RegulatorServer(ServerConfig(port=0, metrics_port=0, state_dir=tmp_path / "state", grace_seconds=1.0, limits=roomy_limits()))
    srv.start()
    try:
        report = dict(attempt=0, epoch=0, count=4, score_sums={"a": 2.0, "b": 3.0}, fisher={"a": 1.0, "b": 0.5})
        nan = dict(report, score_sums={"a": float("nan"), "b": 1.0})
        with RegulatorClient.connect(srv.target, timeout=30.0, report_stream=False) as unary, \
                RegulatorClient.connect(srv.target, timeout=30.0, report_stream=True) as streamed:
            unary.open_session("mixed", ["a", "b"], "none")
            for step in range(3):
                unary.report("mixed", step=step, **report)
            unary.report("mixed", step=2, **report)  # a retry: the stored answer
            with pytest.raises(Exception, match="(?i)nan|finite|invalid"):
                unary.report("mixed", step=3, **nan)
            for step in range(3, 7):
                streamed.report("mixed", step=step, **report)
            streamed.report("mixed", step=6, **report)
            with pytest.raises(Exception, match="(?i)nan|finite|invalid"):
                streamed.report("mixed", step=7, **nan)
        # The stream that the rejected Report ended is handled (and its lifetime observed).
        ended = lambda: any(lab["grpc_method"] == "ReportStream" for lab, _ in Scrape(scrape(srv.metrics_port)).series("grpc_server_handling_seconds_count"))  # noqa: E731
        wait_until(ended, "the stream's end is counted")
        s = Scrape(scrape(srv.metrics_port))
    finally:
        srv.stop(grace=0)
    assert s.value("inforeg_regulator_reports_total", outcome="recorded") == 7
    assert s.value("inforeg_regulator_reports_total", outcome="duplicate") == 2
    assert s.value("inforeg_regulator_reports_total", outcome="rejected") == 2
    assert s.value("inforeg_regulator_report_seconds_count", rpc="Report") == 5
    assert s.value("inforeg_regulator_report_seconds_count", rpc="ReportStream") == 6
    svc = "inforeg.regulator.v1.Regulator"
    assert s.value("grpc_server_msg_received_total", grpc_type="bidi_stream", grpc_service=svc, grpc_method="ReportStream") == 6
    # Every latency panel reads unary RPCs or the per-Report histogram, never a stream's lifetime.
    latency = [(w, e) for w, e in dashboard_queries() if "seconds_bucket" in e and "state_store" not in e]
    assert latency, "no latency panel"
    seen_rpc = set()
    for where, expr in latency:
        for name, matchers in promql_selectors(expr):
            selected = [lab for lab, _ in s.series(name) if _matches(lab, matchers)]
            assert selected, f"{where}: selects nothing of {name}"
            assert all(lab.get("grpc_method") != "ReportStream" for lab in selected), f"{where}: reads ReportStream's lifetime"
            seen_rpc |= {lab["rpc"] for lab in selected if "rpc" in lab}
    assert seen_rpc == {"Report", "ReportStream"}, "the Report latency panel shows Reports however sent"
