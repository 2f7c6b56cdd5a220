"""The client's CPU per Report against a real ``regulator serve`` (SQLite) on loopback: unary
Reports against the messages of one Report stream per job (``GrpcTransport``'s default).

    python -m bench.client_report                      # 3 rounds of 2,000 Reports each way
    python -m bench.client_report --reports 5000 --rounds 5

The server runs in a child process pinned to the first CPU, this process (the client) on the
last one; the figures are this process's CPU time (every thread: grpcio's own, the stream's
request thread, the deadline watchdog) and the server's (from /proc) per Report, one job sending its steps one at a time as
the hook does, the median of the rounds, the two modes interleaved so that a change of machine
load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.transport import GrpcTransport
from trainers.serverproc import ServerProcess

MODALITIES = ("audio", "visual")


def cpu_s(pid: int) -> float:
    """The CPU time (user + system) process ``pid`` has used, from /proc (Linux)."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(target: str, server_pid: int, job: str, reports: int, stream: bool) -> tuple[float, float, float]:
    """(client CPU us, server CPU us, wall us) per Report of ``reports`` Reports of one job,
    after 100 warm-up ones."""
    with RegulatorClient(GrpcTransport(target, timeout=30, report_stream=stream)) as client:
        client.open_session(job, list(MODALITIES), "official")
        req = pb.ReportRequest(job_id=job, count=64, stats=[
            pb.ModalityStats(modality=m, score_sum=40.0 + i, fisher=1e-4 * (i + 1)) for i, m in enumerate(MODALITIES)])
        for step in range(100):
            req.step = step
            client.transport.report(req)
        c0, s0, w0 = time.process_time(), cpu_s(server_pid), time.perf_counter()
        for step in range(100, 100 + reports):
            req.step = step
            client.transport.report(req)
        c1, s1, w1 = time.process_time(), cpu_s(server_pid), time.perf_counter()
    return 1e6 * (c1 - c0) / reports, 1e6 * (s1 - s0) / reports, 1e6 * (w1 - w0) / reports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", type=int, default=2000, help="Reports per round and mode")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    figures: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="client-report-") as state:
        with ServerProcess(state) as server:
            assert server.proc is not None
            if len(cpus) > 1:
                os.sched_setaffinity(server.proc.pid, {cpus[0]})
                for task in os.listdir(f"/proc/{server.proc.pid}/task"):
                    os.sched_setaffinity(int(task), {cpus[0]})
                os.sched_setaffinity(0, {cpus[-1]})
            for r in range(args.rounds):
                for stream in (False, True):
                    figures[stream].append(run(server.target, server.proc.pid, f"bench-{r}-{int(stream)}", args.reports, stream))
    load = os.getloadavg()[0]
    print(f"client CPU per Report ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {len(cpus)} CPUs, load average "
          f"{load:.1f}; server SQLite on CPU {cpus[0]}, client on {cpus[-1]}; {args.reports} Reports x "
          f"median of {args.rounds} rounds)")
    print(f"{'Reports as':<20}{'client CPU us':>14}{'server CPU us':>14}{'both':>7}{'wall us':>9}   (per Report)")
    for stream, name in ((False, "unary calls"), (True, "a stream per job")):
        client, server, wall = (statistics.median(f[i] for f in figures[stream]) for i in range(3))
        print(f"{name:<20}{client:>14.0f}{server:>14.0f}{client + server:>7.0f}{wall:>9.0f}")


if __name__ == "__main__":
    main()
