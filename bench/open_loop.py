"""Open-loop overload: N Reports sent as fast as possible without waiting for answers, and what
became of each one, counted on both sides.

    python -m bench.open_loop --reports 30000                 # a fresh `regulator serve --in-memory`
    python -m bench.open_loop --reports 30000 --timeout 10    # with a 10 s client deadline
    python -m bench.open_loop --reports 2000 --server-args "--max-concurrent-rpcs 4"
    python -m bench.open_loop --target 127.0.0.1:50051 --metrics-url http://127.0.0.1:9090/metrics

Every Report is one ``stub.Report.future(...)`` on one channel (the way a probe floods a server;
the client library never sends this way: it waits for each answer and retries a shed call). The
client side counts the status code of every call; the server side is read from its /metrics
before and after: ``grpc_server_started_total`` and ``grpc_server_handled_total{grpc_code}`` of
Report (shed calls and calls gone before a worker took them included). The table puts them side
by side: every client-side code should be matched by the server's count of that code, CANCELLED
and DEADLINE_EXCEEDED included.

``run(...) -> dict`` is the entry point for tests and scripts; ``main()`` prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

MODALITIES = ("audio", "visual")
# grpc_code label values of grpc_server_handled_total (go-grpc-prometheus) -> client StatusCode names
_GO_TO_CLIENT = {"Canceled": "CANCELLED", "OK": "OK"}


def _client_name(go_code: str) -> str:
    if go_code in _GO_TO_CLIENT:
        return _GO_TO_CLIENT[go_code]
    out = [go_code[0]]
    for ch in go_code[1:]:
        if ch.isupper():
            out.append("_")
        out.append(ch)
    return "".join(out).upper()


def server_counts(metrics_url: str) -> dict[str, Any]:
    """The Report counters of the server's /metrics: started, and handled by code (client-side
    names)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=30) as resp:
        text = resp.read().decode()
    started = 0.0
    handled: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("grpc_method") != "Report":
                continue
            if s.name == "grpc_server_started_total":
                started += s.value
            elif s.name == "grpc_server_handled_total":
                handled[_client_name(s.labels["grpc_code"])] += int(s.value)
    return {"started": int(started), "handled": dict(handled)}


def _proc_kib(pid: int, key: str) -> Optional[int]:
    """A ``/proc/PID/status`` figure in KiB (VmRSS, VmHWM: the peak RSS); None off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    def sub(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
        return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}

    return {
        "started": after["started"] - before["started"],
        "handled": sub(after["handled"], before["handled"]),
    }


def settled_counts(metrics_url: str, before: dict[str, Any], expected: int, quiet_s: float = 1.0) -> dict[str, Any]:
    """The server's counts once it has counted ``expected`` Reports, or once they stopped
    changing for ``quiet_s`` (calls grpc core cancelled never arrive): a call's count lands just
    after its answer is sent, so the last ones may trail the client's last answer."""
    last, since = None, time.monotonic()
    while True:
        now = _diff(server_counts(metrics_url), before)
        total = sum(now["handled"].values())
        if total >= expected:
            return now
        if total != last:
            last, since = total, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return now
        time.sleep(0.05)


def flood(target: str, reports: int, sessions: int, timeout: Optional[float], channels: int = 1) -> dict[str, Any]:
    """Opens ``sessions`` sessions, then sends ``reports`` Reports (round robin over sessions,
    steps counting up) without waiting for any answer, then waits for every answer. With
    ``sessions`` 0 every Report names a job that was never opened (NOT_FOUND, nothing stored:
    what the burst itself costs the server)."""
    import grpc

    from inforeg.regulator.v1 import regulator_pb2 as pb
    from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc

    chans = [grpc.insecure_channel(target) for _ in range(channels)]
    try:
        stubs = [pb_grpc.RegulatorStub(c) for c in chans]
        jobs = [f"open-loop-{os.getpid()}-{i}" for i in range(max(sessions, 1))]
        for job in jobs[:sessions]:
            stubs[0].OpenSession(pb.OpenSessionRequest(job_id=job, modalities=list(MODALITIES)), timeout=60)
        stats = [pb.ModalityStats(modality=m, score_sum=40.5, fisher=1.25e-4) for m in MODALITIES]
        requests = [
            pb.ReportRequest(job_id=jobs[i % len(jobs)], epoch=0, step=i // len(jobs), count=64, stats=stats)
            for i in range(reports)
        ]
        t0 = time.perf_counter()
        calls = [stubs[i % channels].Report.future(r, timeout=timeout) for i, r in enumerate(requests)]
        sent_s = time.perf_counter() - t0
        codes = Counter(call.code().name for call in calls)
        done_s = time.perf_counter() - t0
        retry_after = sum(
            1 for call in calls
            if call.code().name == "RESOURCE_EXHAUSTED"
            and any(k == "inforeg-retry-after-ms" for k, _ in (call.trailing_metadata() or ()))
        )
    finally:
        for c in chans:
            c.close()
    return {"codes": dict(codes), "retry_after": retry_after, "sent_s": round(sent_s, 2), "done_s": round(done_s, 2)}


def run(
    reports: int = 30000,
    sessions: int = 8,
    timeout: Optional[float] = None,
    channels: int = 1,
    server_args: Sequence[str] = (),
    target: Optional[str] = None,
    metrics_url: Optional[str] = None,
) -> dict[str, Any]:
    """One flood against ``target`` (else a fresh ``regulator serve --in-memory`` with
    ``server_args``), with the server's counts before and after."""
    from trainers.serverproc import launch, regulator_command

    proc = None
    with tempfile.TemporaryDirectory(prefix="open-loop-") as tmp:
        if target is None:
            ready = Path(tmp) / "ready.json"
            cmd = regulator_command(ready, "--in-memory", "--metrics-port", "0", *server_args)
            log = open(Path(tmp) / "server.log", "wb")
            proc, info = launch(cmd, ready, stdout=log, stderr=subprocess.STDOUT)
            target = f"127.0.0.1:{info['port']}"
            metrics_url = f"http://127.0.0.1:{info['metrics_port']}/metrics"
        rss: dict[str, Optional[int]] = {}
        try:
            before = server_counts(metrics_url) if metrics_url else None
            if proc is not None:
                rss["before_kib"] = _proc_kib(proc.pid, "VmRSS")
            client = flood(target, reports, sessions, timeout, channels)
            server = settled_counts(metrics_url, before, reports) if metrics_url and before else None
            if proc is not None:
                rss["peak_kib"] = _proc_kib(proc.pid, "VmHWM")
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
                log.close()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "reports": reports, "sessions": sessions, "timeout_s": timeout, "channels": channels,
        "server_args": list(server_args),
        "client": client, "server": server, "server_rss": rss,
    }


def table(r: dict[str, Any]) -> str:
    client, server = r["client"], r["server"]
    lines = [
        f"{r['reports']} open-loop Reports, {r['sessions']} sessions, {r['channels']} channel(s), "
        f"client timeout {r['timeout_s']} s, server args {' '.join(r['server_args']) or '(defaults)'}",
        f"{r['date']}, {r['machine']}; all sent in {client['sent_s']} s, all answered in {client['done_s']} s",
        f"{'code':<22}{'client':>10}{'server handled':>16}",
    ]
    codes = sorted(set(client["codes"]) | set((server or {}).get("handled", {})))
    for code in codes:
        s = server["handled"].get(code, 0) if server else "-"
        lines.append(f"{code:<22}{client['codes'].get(code, 0):>10}{s:>16}")
    if server:
        lines.append(f"server: Report started {server['started']}, handled {sum(server['handled'].values())}")
    lines.append(f"RESOURCE_EXHAUSTED with the retry-after key: {client['retry_after']}")
    rss = r.get("server_rss") or {}
    if rss.get("before_kib") and rss.get("peak_kib"):
        lines.append(f"server RSS before the burst {rss['before_kib'] / 1024:.0f} MiB, peak {rss['peak_kib'] / 1024:.0f} MiB")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.open_loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--reports", type=int, default=30000)
    p.add_argument("--sessions", type=int, default=8, help="sessions the Reports go to (0: a job never opened)")
    p.add_argument("--timeout", type=float, default=None, help="client deadline of each Report (default: none)")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--server-args", default="", help="extra `regulator serve` arguments (one string)")
    p.add_argument("--target", help="an already running regulator instead of a fresh one")
    p.add_argument("--metrics-url", help="its /metrics (with --target)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    from .output import emit

    r = run(args.reports, args.sessions, args.timeout, args.channels, shlex.split(args.server_args), args.target, args.metrics_url)
    return emit(r, table(r), args.json)


if __name__ == "__main__":
    sys.exit(main())
