"""What reaches a real `regulator serve` process from outside, over real gRPC and HTTP(S):
callers without a token, numbers that overflow, scrapers of /metrics, bursts of load, renewed
certificates, and kubelet probes (issue 8 items 1, 7, 8, 9; issue 12 items 3 and 4)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import ssl
import string
import subprocess
import threading
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from regulator_client import RegulatorClient
from regulator_client.delivery import Delivery
from regulator_client.errors import InvalidArgument, Overloaded, ResourceExhausted, Unavailable, retry_after_ms
from regulator_client.transport import GrpcTransport, TlsConfig
from regulator_service.edge.security import TlsFiles
from regulator_service.edge.server import SERVICE_NAME, RegulatorServer, ServerConfig

from .conftest import ROOT, free_port, metric, wait_until
from .pki import Pki, make_pki
from .serving import Served, serving

pytestmark = pytest.mark.e2e

TOKEN = "front-door-token-0123456789"


def scrape(url: str, token: Optional[str] = None, context: Optional[ssl.SSLContext] = None) -> str:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10, context=context) as resp:
        return resp.read().decode()


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(text) for s in f.samples}


def stats(**fisher: Any) -> dict[str, Any]:
    return dict(count=4, score_sums={"a": 3.0, "b": 1.0}, fisher=fisher)


# -- issue 8.1: nothing unauthenticated grows ----------------------------------------------------


def _random_path(rng: random.Random, length: int) -> str:
    word = lambda n: "".join(rng.choices(string.ascii_letters, k=n))  # noqa: E731
    return f"/{word(length)}.{word(8)}/{word(length)}"


def _call_made_up_methods(target: str, n: int, rng: random.Random, token: Optional[str] = None) -> Counter:
    """``n`` unary calls to random ~4 KB method names, at most 16 in flight."""
    codes: Counter = Counter()
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as channel:
        def one(path: str) -> None:
            try:
                channel.unary_unary(path)(b"\x08\x01", timeout=30, metadata=metadata)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, [_random_path(rng, 2000) for _ in range(n)]))
    return codes


def test_unauthenticated_calls_to_made_up_methods_leave_metrics_and_memory_bounded(tmp_path: Path) -> None:
    """With a token required, thousands of calls without it to random long method names used to
    add 22 series per name (641 MB of /metrics after 5,000). Now every unregistered path is
    counted as grpc_service="unknown": /metrics and the server's RSS stay flat from N to 3N calls."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    n = 1000
    rng = random.Random(8)
    with serving(tmp_path, "--token-file", str(token_file), "--metrics-port", "0") as srv:
        url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        assert _call_made_up_methods(srv.target, n, rng) == Counter(UNAUTHENTICATED=n)
        after_n, rss_n = scrape(url), srv.rss_bytes()
        assert _call_made_up_methods(srv.target, 2 * n, rng) == Counter(UNAUTHENTICATED=2 * n)
        after_3n, rss_3n = scrape(url), srv.rss_bytes()
        # authenticated callers of made-up methods get UNIMPLEMENTED, and add no series either
        assert _call_made_up_methods(srv.target, 50, rng, token=TOKEN) == Counter(UNIMPLEMENTED=50)
        final = scrape(url)
        with RegulatorClient.connect(srv.target, token=TOKEN) as client:
            assert client.list_sessions() == []  # the server still serves

    unknown = dict(grpc_type="unary", grpc_service="unknown", grpc_method="unknown")
    assert metric(after_3n, "grpc_server_handled_total", **unknown, grpc_code="Unauthenticated") == 3 * n
    assert series(after_3n) == series(after_n) == series(final)  # not one new series
    assert len(after_3n) - len(after_n) < 1024  # only counter values and latency sums changed
    assert max(len(v) for _, labels in series(final) for _, v in labels) < 100  # no caller-made label
    # Measured from N to 3N (2,000 calls) on 2 cores: +0.2 to +0.8 MiB now, +25 MiB (and /metrics
    # from 90 to 271 MB) with the per-path labels. A constant bound between the two:
    assert rss_3n - rss_n < 8 * 2**20, f"RSS grew by {(rss_3n - rss_n) / 2**20:.1f} MiB from {n} to {3 * n} calls"


# -- issue 8.7: finite inputs never make non-finite records --------------------------------------


def test_reports_that_would_overflow_are_invalid_and_change_nothing(tmp_path: Path) -> None:
    with serving(tmp_path, "--metrics-port", "-1") as srv, RegulatorClient.connect(srv.target) as client:
        client.open_session("big", ["a", "b"], "official")  # window open, "a" leads: regulated
        first = client.report("big", attempt=0, epoch=0, step=0, **stats(a=1.0, b=1.0))
        assert first.step.modalities[0].factors.proximal > 0
        client.report("big", attempt=0, epoch=0, step=1, **stats(a=1.7e308, b=1.0))
        before = client.get_session("big", include_steps=True).SerializeToString(deterministic=True)
        rejected = [
            (dict(step=2, **stats(a=(1e308, -1e308, 1e308), b=1.0)), "regulated Fisher value of 'a'"),
            (dict(step=2, **stats(a=1.7e308, b=1.0)), "Fisher trace of 'a' overflow"),
            (dict(step=2**53, **stats(a=1.0, b=1.0)), r"step must be in \[0, 2\^53 - 1\]"),
            (dict(step=2, epoch=2**53, **stats(a=1.0, b=1.0)), r"epoch must be in \[0, 2\^53 - 1\]"),
        ]
        for call, message in rejected:
            call.setdefault("epoch", 0)
            with pytest.raises(InvalidArgument, match=message):
                client.report("big", attempt=0, **call)
        with pytest.raises(InvalidArgument, match=r"epoch must be in \[0, 2\^53 - 1\]"):
            client.end_epoch("big", attempt=0, epoch=2**53)
        detail = client.get_session("big", include_steps=True)
        assert detail.SerializeToString(deterministic=True) == before  # the session is unchanged
        assert all(math.isfinite(m.fisher) for st in detail.steps for m in st.modalities)

        # -0.0 is stored as 0.0: a retry that sends +0.0 is the same statistics (a duplicate)
        neg = client.report("big", attempt=0, epoch=0, step=2, count=4, score_sums={"a": -0.0, "b": 1.0}, fisher={"a": -0.0, "b": (1.0, -0.0, 0.0)})
        assert [math.copysign(1.0, m.score_sum) for m in neg.step.modalities] == [1.0, 1.0]
        assert math.copysign(1.0, neg.step.modalities[0].fisher) == 1.0
        pos = client.report("big", attempt=0, epoch=0, step=2, count=4, score_sums={"a": 0.0, "b": 1.0}, fisher={"a": 0.0, "b": (1.0, 0.0, 0.0)})
        assert pos.duplicate and pos.step == neg.step
        closed = client.end_epoch("big", attempt=0, epoch=0).closed
        assert all(math.isfinite(m.fisher_trace) for m in closed.modalities)


# -- issue 8.8: /metrics can be protected the ways Prometheus supports --------------------------


def _https_context(ca: Path, cert: Optional[Path] = None, key: Optional[Path] = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _http_status(url: str, **kw: Any) -> int:
    try:
        scrape(url, **kw)
        return 200
    except urllib.error.HTTPError as exc:
        return exc.code


METRICS_TOKEN = "scrape-token-0123456789"


def protected_metrics(tmp_path: Path, pki: Any) -> list[str]:
    """serve flags for a /metrics listener behind a token file (METRICS_TOKEN) and TLS."""
    token = tmp_path / "metrics-token"
    token.write_text(METRICS_TOKEN)
    return ["--metrics-port", "0", "--metrics-token-file", str(token),
            "--metrics-tls-cert", str(pki.server_cert), "--metrics-tls-key", str(pki.server_key)]


def test_metrics_endpoint_requires_its_token_and_serves_https_with_client_certificates(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with serving(tmp_path, *protected_metrics(tmp_path, pki)) as srv:
        url = f"https://localhost:{srv.metrics_port}/metrics"
        trusted = _https_context(pki.ca)
        assert _http_status(url, context=trusted) == 401
        assert _http_status(url, token="wrong-token-0123456789", context=trusted) == 401
        text = scrape(url, token=METRICS_TOKEN, context=trusted)
        assert metric(text, "inforeg_regulator_sessions_open") == 0
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext HTTP is not served
            scrape(f"http://localhost:{srv.metrics_port}/metrics", token=METRICS_TOKEN)
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            scrape(url, token=METRICS_TOKEN, context=ssl.create_default_context())
        assert "https://127.0.0.1:" in srv.output() and "token required" in srv.output()

    # mutual TLS on the metrics listener: a scraper needs a certificate from the client CA
    args = ["--metrics-port", "0", "--metrics-tls-cert", str(pki.server_cert), "--metrics-tls-key", str(pki.server_key),
            "--metrics-tls-client-ca", str(pki.ca)]
    with serving(tmp_path, *args) as srv:
        url = f"https://localhost:{srv.metrics_port}/metrics"
        assert metric(scrape(url, context=_https_context(pki.ca, pki.client_cert, pki.client_key)), "inforeg_regulator_sessions_open") == 0
        for cert, key in ((None, None), (pki.rogue_cert, pki.rogue_key)):
            with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
                scrape(url, context=_https_context(pki.ca, cert, key))


def _targets(prom_port: int) -> dict[str, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/targets", timeout=5) as resp:
            active = json.load(resp)["data"]["activeTargets"]
    except OSError:
        return {}  # Prometheus is still starting
    return {t["labels"]["job"]: t for t in active}


def _start_prometheus(prometheus: str, config: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Prometheus on a free port. The port is picked before Prometheus binds it, so one that
    another process took meanwhile is retried with another; any other failure is final."""
    log_path = tmp_path / "prometheus.log"
    for attempt in range(3):
        port = free_port()
        with open(log_path, "wb") as log:
            prom = subprocess.Popen(
                [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / f'tsdb-{attempt}'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_until(lambda: prom.poll() is not None or bool(_targets(port)), "Prometheus serves its API")
        if prom.poll() is None:
            return prom, port
        if "address already in use" not in log_path.read_text():
            break
    raise AssertionError(f"Prometheus did not start: {log_path.read_text()}")


def test_prometheus_scrapes_the_protected_endpoint_with_the_shipped_scrape_config(tmp_path: Path) -> None:
    """A real Prometheus with deploy/prometheus/prometheus.yml's job (its `authorization` block),
    plus `scheme: https` and `tls_config`: the scrape is up; the same job without the token is
    down with 401."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is not on PATH (Debian package `prometheus`, which also brings promtool)")
    pki = make_pki(tmp_path)
    with serving(tmp_path, *protected_metrics(tmp_path, pki)) as srv:
        (job,) = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
        job.update(scrape_interval="1s", scrape_timeout="1s", scheme="https", tls_config={"ca_file": str(pki.ca)},
                   static_configs=[{"targets": [f"localhost:{srv.metrics_port}"]}])
        job["authorization"]["credentials_file"] = str(tmp_path / "metrics-token")
        anonymous = {k: v for k, v in job.items() if k != "authorization"} | {"job_name": "without-token"}
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({"scrape_configs": [job, anonymous]}))
        prom, prom_port = _start_prometheus(prometheus, config, tmp_path)
        try:
            def settled() -> bool:
                """The token job up, the other down with 401. A scrape that times out on a
                loaded machine is retried by Prometheus every second, so poll for the end state."""
                assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
                t = _targets(prom_port)
                up, anon = t.get(job["job_name"], {}), t.get("without-token", {})
                return up.get("health") == "up" and anon.get("health") == "down" and "401" in anon.get("lastError", "")

            wait_until(settled, "Prometheus scrapes the job with the token (up) and the one without it (401)")
        finally:
            prom.terminate()
            prom.wait(timeout=30)


# -- issue 8.9: load shedding --------------------------------------------------------------------


def _report(job: str, step: int = 0) -> pb.ReportRequest:
    stats_ = [pb.ModalityStats(modality=m, score_sum=1.0, fisher=0.5) for m in ("a", "b")]
    return pb.ReportRequest(job_id=job, attempt=0, epoch=0, step=step, count=4, stats=stats_)


def _started(srv: Served, method: str) -> float:
    text = scrape(f"http://127.0.0.1:{srv.metrics_port}/metrics")
    try:
        return metric(text, "grpc_server_started_total", grpc_type="unary", grpc_service=SERVICE_NAME, grpc_method=method)
    except AssertionError:
        return 0.0


def test_overload_is_shed_with_resource_exhausted_and_every_delivery_mode_recovers(tmp_path: Path) -> None:
    """--max-concurrent-rpcs 2, and calls held at the server while a hold file exists
    (--debug-hold-file): an open-loop burst gets only OK or RESOURCE_EXHAUSTED (never
    CANCELLED); a wait-mode client whose calls are shed retries with backoff and completes; a
    neutral-mode client falls back and delivers later; a real quota (too many sessions) is
    RESOURCE_EXHAUSTED too, but not retried. The held calls stay held until the test has seen
    what it needs, however slow the machine: nothing here depends on timing."""
    hold = tmp_path / "hold"
    args = ["--max-concurrent-rpcs", "2", "--debug-hold-file", str(hold), "--max-sessions", "2", "--metrics-port", "0"]
    with serving(tmp_path, *args) as srv:
        with RegulatorClient.connect(srv.target) as setup:
            setup.open_session("burst", ["a", "b"], "none")
            setup.open_session("waiter", ["a", "b"], "none")
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.RegulatorStub(channel)

            def occupy(method: str, make: Any) -> list[Any]:
                """Both admission slots taken by two calls held at the server (the hold file exists)."""
                hold.touch()
                before = _started(srv, method)
                held = [getattr(stub, method).future(make(i), timeout=120) for i in range(2)]
                wait_until(lambda: _started(srv, method) >= before + 2, "both slots are taken")
                return held

            def release(held: list[Any]) -> None:
                hold.unlink()
                assert all(h.code() == grpc.StatusCode.OK for h in held)

            # open loop: with both slots held, 200 Reports fired at once, no client retries
            held = occupy("Report", lambda i: _report("burst"))
            calls = [stub.Report.future(_report("burst"), timeout=60) for _ in range(200)]
            outcomes = Counter(call.code().name for call in calls)  # every one answered while the slots are held
            release(held)
            assert outcomes == {"RESOURCE_EXHAUSTED": 200}, outcomes
            assert all(retry_after_ms(call) is not None for call in calls)  # the structural "retry later"
            # and a burst against a free server: only OK or RESOURCE_EXHAUSTED, never CANCELLED
            calls = [stub.Report.future(_report("burst"), timeout=60) for _ in range(200)]
            assert set(Counter(call.code().name for call in calls)) <= {"OK", "RESOURCE_EXHAUSTED"}

            # wait mode: shed, retried with backoff inside the transport, answered once a slot frees
            # unary Reports (an older client, or REGULATOR_REPORT_STREAM=off): a streamed Report
            # takes no admission slot (its stream is bounded by --max-streams instead)
            transport = GrpcTransport(srv.target, timeout=60.0, report_stream=False)
            waiting = Delivery(transport, mode="wait", call_timeout=60.0, wait_timeout=120.0)
            held = occupy("ListSessions", lambda i: pb.ListSessionsRequest())
            answers: list[Any] = []
            waiter = threading.Thread(target=lambda: answers.append(waiting.report(_report("waiter", step=0))))
            waiter.start()
            wait_until(lambda: transport.shed_retries >= 1, "the wait-mode call is shed and retried")
            assert waiter.is_alive()  # still waiting: it neither failed nor fell back
            release(held)
            waiter.join(timeout=120)
            assert len(answers) == 1 and answers[0] is not None and answers[0].step.step == 0

            # neutral mode: the step falls back within one call_timeout, and is delivered later
            neutral_transport = GrpcTransport(srv.target, timeout=60.0, report_stream=False)
            neutral = Delivery(neutral_transport, mode="neutral", call_timeout=0.3, wait_timeout=120.0)
            held = occupy("ListSessions", lambda i: pb.ListSessionsRequest())
            request = _report("waiter", step=1)
            assert neutral.report(request) is None  # shed until its 0.3 s were spent: the fallback
            neutral.defer_fallback(request, [0.0, 0.0])
            assert neutral_transport.shed_retries >= 1
            release(held)
            neutral.call_timeout = 60.0
            assert neutral.flush() and neutral.pending == 0  # the deferred step is delivered

            # a quota is not overload: the transport does not retry it
            retries = transport.shed_retries
            with pytest.raises(ResourceExhausted, match="limit is 2") as quota:
                RegulatorClient(transport).open_session("third", ["a", "b"])
            assert not isinstance(quota.value, Overloaded) and transport.shed_retries == retries
            transport.close()
            neutral_transport.close()
        with RegulatorClient.connect(srv.target) as client:
            steps = client.get_session("waiter", include_steps=True).steps
            assert [(s.step, s.fallback) for s in steps] == [(0, pb.FALLBACK_UNSPECIFIED), (1, pb.FALLBACK_NEUTRAL)]


def test_a_shed_call_is_an_unavailable_to_the_hook_and_a_quota_is_not() -> None:
    assert issubclass(Overloaded, Unavailable) and issubclass(Overloaded, ResourceExhausted)
    assert not issubclass(ResourceExhausted, Unavailable)


# -- issue 12.3: certificates reload --------------------------------------------------------------


def _install(src: Pki, cert: Path, key: Path) -> None:
    """Replaces the live files atomically, as a Kubernetes Secret volume does."""
    for source, dest in ((src.server_cert, cert), (src.server_key, key)):
        tmp = dest.with_suffix(".new")
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)


def _lists(target: str, ca: Path, timeout: float = 30.0) -> bool:
    with RegulatorClient.connect(target, tls=TlsConfig(ca=str(ca)), timeout=timeout) as client:
        try:
            client.list_sessions()
            return True
        except Unavailable:
            return False


def test_server_certificate_is_reloaded_without_a_restart(tmp_path: Path) -> None:
    old, new = make_pki(_mkdir(tmp_path / "old")), make_pki(_mkdir(tmp_path / "new"))
    cert, key = tmp_path / "live" / "tls.crt", tmp_path / "live" / "tls.key"
    cert.parent.mkdir()
    _install(old, cert, key)
    with serving(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), "--metrics-port", "-1") as srv:
        target = f"localhost:{srv.port}"
        with RegulatorClient.connect(target, tls=TlsConfig(ca=str(old.ca))) as long_lived:
            long_lived.open_session("renewal", ["a", "b"])
            assert not _lists(target, new.ca)
            _install(new, cert, key)  # cert-manager renews the certificate: a new chain
            assert _lists(target, new.ca)  # a client that trusts only the new chain connects
            assert not _lists(target, old.ca)  # ... and one that trusts only the old one no longer does
            # the established connection was not dropped, and it is the same process
            assert long_lived.get_session("renewal").session.job_id == "renewal"
            assert srv.proc.poll() is None
        # a broken renewal (a key that does not match) is refused; the last good pair serves on
        shutil.copyfile(old.server_key, key)
        assert _lists(target, new.ca)
        assert "unusable, keeping the previous certificate" in srv.output()
        assert "TLS certificate reloaded" in srv.output()


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_client_rebuilds_its_channel_when_its_tls_files_change(tmp_path: Path) -> None:
    """The server comes back (same port) with a certificate from a new CA, and the client's CA
    file is renewed: the client picks the new file up; one that never re-reads cannot connect."""
    old, new = make_pki(_mkdir(tmp_path / "old")), make_pki(_mkdir(tmp_path / "new"))
    ca = tmp_path / "ca.crt"
    shutil.copyfile(old.ca, ca)
    with RegulatorServer(ServerConfig(port=0, tls=TlsFiles(old.server_cert, old.server_key))) as first:
        port = first.port
        target = f"localhost:{port}"
        renewing = GrpcTransport(target, timeout=5.0, tls=TlsConfig(ca=str(ca)), tls_recheck_s=0.0)
        stale = GrpcTransport(target, timeout=5.0, tls=TlsConfig(ca=str(ca)), tls_recheck_s=3600.0)
        for t in (renewing, stale):
            RegulatorClient(t).list_sessions()
    tmp = ca.with_suffix(".new")
    shutil.copyfile(new.ca, tmp)
    os.replace(tmp, ca)
    with RegulatorServer(ServerConfig(port=port, tls=TlsFiles(new.server_cert, new.server_key))):
        assert RegulatorClient(renewing).list_sessions() == []
        assert renewing.channels_opened == 2
        with pytest.raises(Unavailable):
            RegulatorClient(stale).list_sessions()
    renewing.close()
    stale.close()


# -- issue 12.4: --health-host --------------------------------------------------------------------


def test_health_host_serves_probes_apart_from_the_loopback_only_rpcs(tmp_path: Path) -> None:
    """The sidecar layout: Regulator RPCs on 127.0.0.1 only, the kubelet's health port on
    another address (0.0.0.0 in a pod; 127.0.0.2, another local address, here)."""
    probe_host = "127.0.0.2"
    try:
        socket.create_server((probe_host, 0)).close()
    except OSError:
        pytest.skip(f"{probe_host} is not a local address on this machine")
    with serving(tmp_path, "--host", "127.0.0.1", "--health-host", probe_host, "--health-port", "0", "--metrics-port", "-1") as srv:
        with grpc.insecure_channel(f"{probe_host}:{srv.health_port}") as ch:
            check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as only_health:  # the health port serves nothing else
                pb_grpc.RegulatorStub(ch).ListSessions(pb.ListSessionsRequest(), timeout=10)
            assert only_health.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with RegulatorClient.connect(f"{probe_host}:{srv.port}", timeout=30) as outside:
            with pytest.raises(Unavailable):  # nothing listens for RPCs off loopback
                outside.list_sessions()
        with RegulatorClient.connect(srv.target) as inside:
            assert inside.list_sessions() == []
        assert f"health port {probe_host}:{srv.health_port}" in srv.output()


def test_metrics_host_binds_metrics_apart_from_the_rpcs(tmp_path: Path) -> None:
    """``--metrics-host``: /metrics listens on its own address only (issue 8 item 8), so it can
    be kept where only Prometheus reaches it while the RPCs listen elsewhere."""
    metrics_host = "127.0.0.2"
    try:
        socket.create_server((metrics_host, 0)).close()
    except OSError:
        pytest.skip(f"{metrics_host} is not a local address on this machine")
    with serving(tmp_path, "--host", "127.0.0.1", "--metrics-host", metrics_host, "--metrics-port", "0") as srv:
        assert metric(scrape(f"http://{metrics_host}:{srv.metrics_port}/metrics"), "inforeg_regulator_sessions_open") == 0
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # nothing serves /metrics on the RPC address
            scrape(f"http://127.0.0.1:{srv.metrics_port}/metrics")
        with RegulatorClient.connect(srv.target) as client:
            assert client.list_sessions() == []
        assert f"metrics http://{metrics_host}:{srv.metrics_port}/metrics" in srv.output()
