"""Server load: Report QPS and latency of the regulator against the grpcio floor, in one run.

    python -m bench.server_load                       # echo floor, SQLite and memory store at 1/4/16 in flight
    python -m bench.server_load --duration 10 --rounds 3 --json results/server_load.json
    git worktree add /tmp/before ac79999 && python -m bench.server_load --baseline /tmp/before   # before/after
    python -m bench.server_load --servers echo echo-interceptors echo-aio   # what the floor is made of
    python -m bench.server_load --servers echo echo-busy echo-stream --concurrency 16   # the room above the floor
    python -m bench.server_load --in-process 5000 [--baseline /tmp/before]   # the Report without gRPC, SQLite alone
    python -m bench.server_load --servers echo sqlite sqlite-stream postgresql --concurrency 16   # stores, a stream
    python -m bench.server_load --servers echo echo-stream sqlite-stream memory-stream postgresql-stream --concurrency 16

Three servers take the same closed-loop load from the same load generator: a trivial grpcio
server that answers every Regulator RPC with a canned message (the floor: what any grpcio
server pays per call), ``regulator serve`` with its SQLite store, and ``regulator serve
--in-memory``. Each client has its own channel (its own connection) and its own session and
sends Reports with realistic statistics (two modalities, ``official`` profile) and an EndEpoch
every 100 steps; ``in flight`` is the number of such clients. The server runs on one CPU and the
load generator on the others (``taskset`` where available, else ``sched_setaffinity``), so the
floor is one core's worth of grpcio. Servers alternate within each round (A B C A B C) so that
machine noise hits all of them alike; the summary is the median over rounds. Besides QPS and
latency, each cell gives the server's CPU time per call (steadier than QPS on a shared machine),
its ratio to the floor's CPU per call in the same run (``CPU x floor``, issue 20's measure), and
the context switches of the server's threads per call (each a thread that blocked or was
preempted: where a Python server's CPU goes besides its code).
``sqlite-stream`` (and ``memory-stream``, ``postgresql-stream``) is the same regulator answering
Reports sent as the messages of one ``ReportStream`` per client (the wire contract's stream per
job, its ``x-inforeg-job`` header set, ``--max-streams`` above the clients), and ``postgresql``
the regulator on a throwaway PostgreSQL cluster whose CPU time is counted with the server's
(``of it DB``; ``bench/pg_cluster.py``). The cluster runs apart from the server's CPU (on the
load's), as a database runs on a machine of its own; ``--database-cpus server`` puts it on the
regulator's core instead, where each commit's wake-up of the database preempts the regulator's
threads mid hand-over of the GIL (about twice the context switches per Report; see
docs/performance.md).
``echo-aio`` is the same trivial server on ``grpc.aio`` (a lower floor on this harness, so the
synchronous one stays the floor) and ``echo-interceptors`` the floor behind the regulator's own
interceptors. Two more measure the room a Python server has above the floor: ``echo-busy`` spends
``--busy-us`` microseconds of pure-Python CPU in each handler before answering (the regulator's
whole per-Report budget if it is to keep 80% of the floor), and ``echo-stream`` answers the
messages of a ``ReportStream`` per client with a canned answer (the floor for streams: what grpcio
costs per message when the Report is not a call of its own).

``run(...) -> dict`` is the entry point for ``make bench``; ``main()`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Optional, Sequence

SERVERS = ("echo", "echo-aio", "echo-interceptors", "echo-busy", "echo-stream", "sqlite", "sqlite-stream", "postgresql",
           "postgresql-stream", "memory", "memory-stream", "baseline")
DATABASE_PLACES = ("apart", "server")
STREAM_MAX = 1024  # --max-streams of the regulator under a stream load: above any --concurrency here
JOB_HEADER = "x-inforeg-job"  # the routing header a stream names its job by (client/routing.py)
DEFAULT_BUSY_US = 30.0
MODALITIES = ("audio", "visual")
END_EVERY = 100  # an EndEpoch every this many steps, as a 100-step epoch would


# -- placement ---------------------------------------------------------------------------------


def placement() -> tuple[list[int], list[int]]:
    """(server CPUs, load CPUs): the first CPU for the server, the rest for the load; all of
    them for both on a single-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return cpus, cpus
    return cpus[:1], cpus[1:]


def pinned(cmd: list[str], cpus: Sequence[int]) -> dict[str, Any]:
    """Popen arguments that run ``cmd`` on ``cpus``: taskset when installed, else the child
    pins itself with sched_setaffinity before exec."""
    if shutil.which("taskset"):
        return {"args": ["taskset", "-c", ",".join(map(str, cpus)), *cmd]}
    return {"args": cmd, "preexec_fn": lambda: os.sched_setaffinity(0, set(cpus))}


# -- the floor: a trivial grpcio server ----------------------------------------------------------


def canned_responses() -> dict[str, Any]:
    """Realistic answers of each Regulator RPC, built once."""
    from inforeg.regulator.v1 import regulator_pb2 as pb

    windows = [pb.ModalityWindow(modality=m, open=True, growth=0.07) for m in MODALITIES]
    step = pb.StepRecord(
        epoch=3, step=312, count=64,
        modalities=[
            pb.ModalityStep(modality=m, score_sum=40.5, fisher=1.25e-4, factors=pb.Factors(proximal=0.33))
            for m in MODALITIES
        ],
    )
    info = pb.SessionInfo(job_id="echo", modalities=list(MODALITIES), state=pb.SESSION_STATE_OPEN, window=windows)
    return {
        "OpenSession": pb.OpenSessionResponse(session=info, created=True),
        "Report": pb.ReportResponse(step=step, window=windows),
        "EndEpoch": pb.EndEpochResponse(next_epoch=4, next_window=windows),
    }


def _echo_handlers(asynchronous: bool = False) -> tuple[str, dict[str, Any]]:
    """(service name, handlers) answering each Regulator RPC with its canned message, after
    deserializing the request as the regulator would."""
    import grpc

    from inforeg.regulator.v1 import regulator_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Regulator"]
    canned = canned_responses()
    handlers = {}
    for method in service.methods:
        if method.name not in canned:
            continue
        request_type = getattr(pb, method.input_type.name)
        answer = canned[method.name]

        async def answer_async(request: Any, context: Any, answer: Any = answer) -> Any:
            return answer

        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            answer_async if asynchronous else (lambda request, context, answer=answer: answer),
            request_deserializer=request_type.FromString,
            response_serializer=type(answer).SerializeToString,
        )
    return service.full_name, handlers


def _ready(ready_file: str, port: int) -> None:
    tmp = Path(ready_file + ".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    tmp.replace(ready_file)


def spin(seconds: float) -> None:
    """Pure-Python work: runs bytecode until this thread has used ``seconds`` of CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _busy(handler: Any, seconds: float) -> Any:
    """``handler`` (unary) with ``seconds`` of pure-Python CPU work before it answers."""
    import grpc

    inner = handler.unary_unary

    def busy(request: Any, context: Any) -> Any:
        spin(seconds)
        return inner(request, context)

    return grpc.unary_unary_rpc_method_handler(
        busy, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def _stream_handler() -> Any:
    """``ReportStream`` of ``echo-stream``: every ReportRequest message of a client's stream gets
    the canned ReportResponse (decoded and encoded as the unary floor)."""
    import grpc

    from inforeg.regulator.v1 import regulator_pb2 as pb

    answer = canned_responses()["Report"]

    def reports(requests: Any, context: Any) -> Any:
        for _ in requests:
            yield answer

    return grpc.stream_stream_rpc_method_handler(
        reports, request_deserializer=pb.ReportRequest.FromString, response_serializer=pb.ReportResponse.SerializeToString
    )


def serve_echo(ready_file: str, workers: int = 16, interceptors: bool = False, busy_us: float = 0.0,
               stream: bool = False) -> None:
    """The floor: a synchronous grpcio server (as the regulator's) with a trivial handler.
    ``interceptors``: with the regulator's own interceptors and RPC limit in front of it
    (``--servers echo-interceptors``), to measure what they cost per call. ``busy_us``: that
    much pure-Python CPU per call first (``echo-busy``). ``stream``: also ``ReportStream``
    (``echo-stream``; one worker thread per open stream, so as many workers as clients may come)."""
    import grpc

    name, handlers = _echo_handlers()
    if busy_us > 0:
        handlers = {method: _busy(h, busy_us * 1e-6) for method, h in handlers.items()}
    if stream:
        workers = max(workers, 64)
        handlers = {**handlers, "ReportStream": _stream_handler()}
    options: dict[str, Any] = {}
    if interceptors:
        from prometheus_client import CollectorRegistry

        from regulator_service.edge.interceptors import MalformedRequestInterceptor, MetricsInterceptor
        from regulator_service.edge.metrics import GrpcServerMetrics
        from regulator_service.edge.server import DEFAULT_MAX_CONCURRENT_RPCS, REGISTERED_METHODS

        metrics = GrpcServerMetrics(CollectorRegistry())
        options = {
            "interceptors": [MetricsInterceptor(metrics, REGISTERED_METHODS), MalformedRequestInterceptor()],
            "maximum_concurrent_rpcs": DEFAULT_MAX_CONCURRENT_RPCS,
        }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), **options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _ready(ready_file, port)
    server.wait_for_termination()


def serve_echo_aio(ready_file: str) -> None:
    """The same trivial server on ``grpc.aio`` (one event loop, no worker threads), to check
    which of the two is the faster floor on this harness (``--servers echo-aio``)."""
    import asyncio

    import grpc

    async def main() -> None:
        name, handlers = _echo_handlers(asynchronous=True)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        _ready(ready_file, port)
        await server.wait_for_termination()

    asyncio.run(main())


# -- the load generator -------------------------------------------------------------------------


def _client(target: str, index: int, run_id: str, start: threading.Barrier, window: list[float],
            stop: threading.Event, out: list[Any], stream: bool) -> None:
    try:
        out[index] = _client_loop(target, index, run_id, start, window, stop, stream)
    except BaseException as exc:  # noqa: BLE001 - reported by load()
        out[index] = exc
        start.abort()
        stop.set()


class _Outbox:
    """The request side of a client's Report stream: yields what ``put`` hands it, ends on None."""

    def __init__(self) -> None:
        import queue

        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.put = self._queue.put

    def __iter__(self) -> Any:
        return iter(self._queue.get, None)


def _client_loop(target: str, index: int, run_id: str, start: threading.Barrier, window: list[float],
                 stop: threading.Event, stream: bool = False) -> tuple[list[float], int]:
    """One closed-loop client. ``stream``: Reports go as the messages of one ``ReportStream``
    (the job in its header) and each waits for its answer before the next is sent."""
    import grpc

    from inforeg.regulator.v1 import regulator_pb2 as pb
    from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc

    rng = random.Random(index)
    job = f"load-{run_id}-{index}"
    latencies: list[float] = []
    calls = 0
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.RegulatorStub(channel)
        outbox = _Outbox()
        answers = stub.ReportStream(iter(outbox), metadata=((JOB_HEADER, job),), timeout=3600) if stream else None

        def report(request: Any, timeout: float) -> Any:
            if answers is None:
                return stub.Report(request, timeout=timeout)
            outbox.put(request)
            return next(answers)
        stub.OpenSession(
            pb.OpenSessionRequest(job_id=job, modalities=list(MODALITIES), profile=pb.Profile(official=pb.OfficialProfile())),
            timeout=30, wait_for_ready=True,
        )
        start.wait()
        step = 0
        while not stop.is_set():
            epoch = step // END_EVERY
            req = pb.ReportRequest(
                job_id=job, epoch=epoch, step=step, count=64,
                stats=[
                    pb.ModalityStats(modality=m, score_sum=64 * rng.uniform(0.2, 0.95), fisher=abs(rng.gauss(0, 1e-4)))
                    for m in MODALITIES
                ],
            )
            t0 = time.perf_counter()
            report(req, timeout=30)
            t1 = time.perf_counter()
            if window[0] <= t0 and t1 <= window[1]:
                latencies.append(t1 - t0)
            step += 1
            calls += 1
            if step % END_EVERY == 0:
                stub.EndEpoch(pb.EndEpochRequest(job_id=job, epoch=epoch), timeout=30)
                calls += 1
        outbox.put(None)
        if answers is not None:
            for _ in answers:  # the server ends the stream once the requests have ended
                pass
    return latencies, calls + 1  # + OpenSession


def load(target: str, clients: int, duration_s: float, warmup_s: float, stream: bool = False) -> dict[str, Any]:
    """Closed-loop load: ``clients`` threads, each its own channel and session; Report latency
    and QPS inside the measurement window (after ``warmup_s``). ``stream``: see ``_client_loop``."""
    run_id = f"{os.getpid()}-{time.time_ns()}"
    start = threading.Barrier(clients + 1, timeout=120)
    stop = threading.Event()
    window = [float("inf"), float("inf")]
    out: list[Any] = [None] * clients
    threads = [
        threading.Thread(target=_client, args=(target, i, run_id, start, window, stop, out, stream), daemon=True)
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    start.wait()
    now = time.perf_counter()
    window[0], window[1] = now + warmup_s, now + warmup_s + duration_s
    time.sleep(warmup_s + duration_s)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    failed = [x for x in out if isinstance(x, BaseException)]
    if failed:
        raise RuntimeError(f"a load client failed: {failed[0]!r}") from failed[0]
    lat = sorted(x for per, _ in out for x in per)
    if not lat:
        raise RuntimeError(f"no Report completed inside the window against {target}")
    return {
        "in_flight": clients,
        "reports": len(lat),
        "calls_total": sum(n for _, n in out),
        "qps": len(lat) / duration_s,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p90_ms": 1000 * lat[int(len(lat) * 0.9)],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    }


# -- servers -------------------------------------------------------------------------------------


class Server:
    """A server process (echo floor or ``regulator serve``) on the server CPUs."""

    def __init__(self, kind: str, cpus: Sequence[int], workdir: Path, extra: Sequence[str] = (),
                 state_dir: Optional[Path] = None, baseline: Optional[str] = None,
                 busy_us: float = DEFAULT_BUSY_US, db_cpus: Optional[Sequence[int]] = None) -> None:
        """``kind`` "baseline": the SQLite server of another checkout (``baseline``, e.g. a
        ``git worktree`` of an older commit), run from its own sources. ``busy_us``: the work
        per call of ``echo-busy``. ``db_cpus``: where a PostgreSQL kind's cluster runs (default
        the server's CPUs)."""
        self.kind = kind
        ready = workdir / f"{kind}-{time.time_ns()}.json"
        env = None
        self.pg: Any = None  # postgresql: the throwaway cluster, on the server's CPUs
        if kind.startswith("postgresql"):
            from bench.pg_cluster import PgCluster

            self.pg = PgCluster(db_cpus or cpus)
            try:
                extra = (*extra, "--store", self.pg.start())
            except BaseException:
                self.pg.stop()
                raise
        store = kind.removesuffix("-stream")  # a -stream regulator: the same server, Reports on streams
        if kind.startswith("echo"):
            cmd = [sys.executable, "-m", "bench.server_load", f"--serve-{kind}", str(ready), "--busy-us", str(busy_us)]
        else:
            cmd = [sys.executable, "-m", "regulator_service", "--port", "0", "--metrics-port", "-1",
                   "--ready-file", str(ready), *extra]
            if store != kind:
                cmd += ["--max-streams", str(STREAM_MAX)]
            if store == "memory":
                cmd += ["--in-memory"]
            elif store != "postgresql":
                cmd += ["--state-dir", str(state_dir or workdir / f"state-{time.time_ns()}")]
            if kind == "baseline":
                assert baseline is not None
                root = str(Path(baseline).resolve())
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "proto")])}
        from trainers.serverproc import launch  # here: --baseline runs this file as a script of another checkout

        self.log = open(workdir / f"{kind}.log", "ab")
        spec = pinned(cmd, cpus)
        try:
            self.proc, info = launch(spec.pop("args"), ready, 60, kind, **spec, stdout=self.log, stderr=self.log, env=env,
                                     cwd=str(Path(baseline).resolve()) if kind == "baseline" else None)
        except (RuntimeError, TimeoutError) as exc:
            self.log.close()
            if self.pg is not None:
                self.pg.stop()
            raise RuntimeError(f"{kind} server did not start ({exc}): {' '.join(cmd)} (log {self.log.name})") from None
        self.target = f"127.0.0.1:{info['port']}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if self.pg is not None:
            self.pg.stop()

    def cpu_seconds(self) -> Optional[float]:
        """The server's CPU time so far; with PostgreSQL, its cluster's too (the postmaster, its
        backends, and the children it has reaped): what one Report costs the machine."""
        own = cpu_seconds(self.proc.pid)
        if own is None or self.pg is None:
            return own
        db = self.db_cpu_seconds()
        return None if db is None else own + db

    def db_cpu_seconds(self) -> Optional[float]:
        """The PostgreSQL cluster's share of ``cpu_seconds`` (None without one)."""
        if self.pg is None:
            return None
        from bench.pg_cluster import tree_pids

        postmaster = self.pg.postmaster_pid()
        if postmaster is None:
            return None
        return sum(cpu_seconds(pid, reaped=pid == postmaster) or 0.0 for pid in tree_pids(postmaster))


def context_switches(pid: int) -> Optional[int]:
    """Voluntary + involuntary context switches of a process's live threads so far (Linux
    ``/proc``; None elsewhere): a thread that blocks, or is preempted, switches once."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for task in tasks:
        try:
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:
            continue  # a thread that ended meanwhile
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                total += int(value)
    return total


def cpu_seconds(pid: int, reaped: bool = False) -> Optional[float]:
    """User + system CPU time of a process so far (Linux ``/proc``; None elsewhere);
    ``reaped``: with that of its children that have exited and been waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(server: Server, clients: int, duration_s: float, warmup_s: float, cpus: Sequence[int]) -> dict[str, Any]:
    """Runs the load generator in its own process on the load CPUs. Besides QPS and latency,
    the server's CPU time per call over the whole run (every RPC the load sent): unlike QPS it
    barely moves when other work shares the machine, so it is the steadier measure of cost."""
    cmd = [sys.executable, "-m", "bench.server_load", "--load", server.target, "--clients", str(clients),
           "--duration", str(duration_s), "--warmup", str(warmup_s)]
    if server.kind.endswith("-stream"):
        cmd.append("--stream")
    cpu0, db0, sw0 = server.cpu_seconds(), server.db_cpu_seconds(), context_switches(server.proc.pid)
    done = subprocess.run(**pinned(cmd, cpus), capture_output=True, text=True, timeout=duration_s + warmup_s + 120)
    cpu1, db1, sw1 = server.cpu_seconds(), server.db_cpu_seconds(), context_switches(server.proc.pid)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed against {server.kind}: {done.stderr[-2000:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    if cpu0 is not None and cpu1 is not None and res.get("calls_total"):
        res["server_us_per_call"] = 1e6 * (cpu1 - cpu0) / res["calls_total"]
    if db0 is not None and db1 is not None and res.get("calls_total"):
        res["db_us_per_call"] = 1e6 * (db1 - db0) / res["calls_total"]
    if sw0 is not None and sw1 is not None and res.get("calls_total"):
        res["switches_per_call"] = (sw1 - sw0) / res["calls_total"]  # the server process's, not the database's
    return res


def run(
    concurrency: Sequence[int] = (1, 4, 16),
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    rounds: int = 1,
    servers: Sequence[str] = ("echo", "sqlite", "memory"),
    server_args: Sequence[str] = (),
    progress: bool = True,
    baseline: Optional[str] = None,
    busy_us: float = DEFAULT_BUSY_US,
    database: str = "apart",
) -> dict[str, Any]:
    """The server-load table: per server and in-flight count, Report QPS, p50/p90/p99 (ms) and
    the ratios to the echo floor measured in the same run (medians over ``rounds``).
    ``baseline``: also the SQLite server of that checkout (an older commit), for a before/after.
    ``busy_us``: the pure-Python work per call of ``echo-busy``. ``database``: where the
    PostgreSQL cluster runs, "apart" from the server's CPU (on the load's, as a database runs on
    a machine of its own) or on the "server"'s CPU with the regulator."""
    if baseline is not None and "baseline" not in servers:
        servers = (*servers, "baseline")
    if database not in DATABASE_PLACES:
        raise ValueError(f"database placement {database!r}: one of {', '.join(DATABASE_PLACES)}")
    server_cpus, load_cpus = placement()
    db_cpus = load_cpus if database == "apart" else server_cpus
    from bench.output import stamp  # here: ``in_process_of`` runs this file without the bench package
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-server-load-") as tmp:
        for r in range(rounds):
            for kind in servers:
                server = Server(kind, server_cpus, Path(tmp), server_args if not kind.startswith("echo") else (),
                                baseline=baseline, busy_us=busy_us, db_cpus=db_cpus)
                try:
                    for n in concurrency:
                        res = measure(server, n, duration_s, warmup_s, load_cpus)
                        samples.setdefault((kind, n), []).append(res)
                        if progress:
                            print(f"  round {r + 1}/{rounds} {kind:>6} x{n:<3} {res['qps']:8.0f} QPS  "
                                  f"p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms  "
                                  f"server {res.get('server_us_per_call', float('nan')):.0f} us CPU/call"
                                  + (f" (database {res['db_us_per_call']:.0f})" if "db_us_per_call" in res else ""),
                                  file=sys.stderr, flush=True)
                finally:
                    server.stop()
    rows = []
    for (kind, n), runs in samples.items():
        rows.append({
            "server": kind,
            "in_flight": n,
            "qps": statistics.median(x["qps"] for x in runs),
            "p50_ms": statistics.median(x["p50_ms"] for x in runs),
            "p90_ms": statistics.median(x["p90_ms"] for x in runs),
            "p99_ms": statistics.median(x["p99_ms"] for x in runs),
            "qps_all": [x["qps"] for x in runs],
            **{key: (statistics.median(x[key] for x in runs) if all(key in x for x in runs) else None)
               for key in ("server_us_per_call", "db_us_per_call", "switches_per_call")},
        })
    floor = {row["in_flight"]: row for row in rows if row["server"] == "echo"}
    for row in rows:
        base = floor.get(row["in_flight"])
        if base is not None:
            row["qps_vs_floor"] = row["qps"] / base["qps"]
            row["p99_vs_floor"] = row["p99_ms"] / base["p99_ms"]
            if row["server_us_per_call"] and base["server_us_per_call"]:
                # issue 20's measure: the server's CPU per Report against the floor's per call
                row["cpu_vs_floor"] = row["server_us_per_call"] / base["server_us_per_call"]
    return {
        "benchmark": "server_load",
        **stamp(),
        "server_cpus": server_cpus,
        "load_cpus": load_cpus,
        "database_cpus": db_cpus if any(kind.startswith("postgresql") for kind in servers) else None,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "rounds": rounds,
        "busy_us": busy_us if "echo-busy" in servers else None,
        "rows": rows,
    }


def in_process(reports: int, stores: Sequence[str] = ("sqlite", "memory")) -> dict[str, float]:
    """CPU microseconds per Report through the regulator's servicer, called in a loop in this
    process (one session, the load generator's requests, an EndEpoch every 100 steps, the
    answer serialized): the Report's own work, without gRPC and without other threads."""
    from inforeg.regulator.v1 import regulator_pb2 as pb

    try:
        from regulator_service.edge.server import RegulatorServer, ServerConfig
        from regulator_service.edge.servicer import RegulatorServicer
    except ImportError:  # a --baseline checkout from before the service was grouped into rooms
        from regulator_service.server import RegulatorServer, ServerConfig  # type: ignore[no-redef]
        from regulator_service.servicer import RegulatorServicer  # type: ignore[no-redef]

    class Context:
        def abort(self, code: Any, details: str) -> None:
            raise RuntimeError(f"{code}: {details}")

    out = {}
    warm = min(1000, reports)
    rng = random.Random(0)
    stats = [[pb.ModalityStats(modality=m, score_sum=64 * rng.uniform(0.2, 0.95), fisher=abs(rng.gauss(0, 1e-4)))
              for m in MODALITIES] for _ in range(101)]
    for store in stores:
        with tempfile.TemporaryDirectory(prefix="bench-in-process-") as tmp:
            server = RegulatorServer(ServerConfig(port=0, state_dir=Path(tmp) if store == "sqlite" else None))
            server.manager.restore()
            api, context = server.api, Context()
            servicer = RegulatorServicer(api, server.metrics)
            api.open_session(pb.OpenSessionRequest(job_id="job", modalities=list(MODALITIES),
                                                   profile=pb.Profile(official=pb.OfficialProfile())))
            requests = [pb.ReportRequest(job_id="job", epoch=s // END_EVERY, step=s, count=64, stats=stats[s % 101])
                        for s in range(warm + reports)]
            t0 = 0.0
            for s, request in enumerate(requests):
                if s == warm:
                    t0 = time.process_time()
                servicer.Report(request, context).SerializeToString()
                if (s + 1) % END_EVERY == 0:
                    api.end_epoch(pb.EndEpochRequest(job_id="job", epoch=s // END_EVERY))
            out[store] = 1e6 * (time.process_time() - t0) / reports
            server.stop(0)  # never started: closes the store and releases the state dir
    return out


def sqlite_rows(rows: int, batch: int = 16) -> float:
    """CPU microseconds per step row of SQLite alone, from Python: the steps table of the state
    file (same columns, key and pragmas: WAL, ``synchronous=NORMAL``), ``batch`` rows per
    ``executemany`` and commit as a full group commit at 16 in flight would have them. What the
    durable part of a Report costs at the very least, whatever the code around it."""
    import sqlite3

    # shaped as the store's step record (storage/codec.py), about 170 characters
    record = json.dumps({"count": 64, "score_sums": [40.123456789, 38.5], "fishers": [0.000123456789, 4.2e-05],
                         "proximal": [0.3321, 0.0], "fallback": 0, "digest": "b5e19901bf573958eca02488f99c9323"},
                        separators=(",", ":"))
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-rows-") as tmp:
        conn = sqlite3.connect(os.path.join(tmp, "state.db"), isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE steps (job_id TEXT NOT NULL, attempt INTEGER NOT NULL, step INTEGER NOT NULL, "
                     "epoch INTEGER NOT NULL, record TEXT NOT NULL, at_ms INTEGER NOT NULL, "
                     "PRIMARY KEY (job_id, attempt, step)) WITHOUT ROWID")
        insert = "INSERT INTO steps (job_id, attempt, step, epoch, record, at_ms) VALUES (?,?,?,?,?,?)"
        batches = [[(f"job-{j}", 0, i, i // END_EVERY, record, 1_700_000_000_000 + i) for j in range(batch)]
                   for i in range(max(1, rows // batch))]
        t0 = time.process_time()
        for params in batches:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(insert, params)
            conn.execute("COMMIT")
        spent = time.process_time() - t0
        conn.close()
    return 1e6 * spent / (len(batches) * batch)


def in_process_of(checkout: str, reports: int) -> dict[str, float]:
    """``in_process`` run on the regulator of another checkout (``--baseline``): this file as
    a script, with that checkout's packages first on the path."""
    root = str(Path(checkout).resolve())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "proto")])}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--in-process", str(reports), "--emit-json"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"in-process run of {checkout} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def in_process_table(result: dict[str, float], prefix: str = "") -> str:
    return "\n".join(f"{prefix}Report in-process, {store:<7} store: {us:6.1f} us CPU per Report"
                      if store != "sqlite_rows" else
                      f"{prefix}SQLite alone, 16 step rows per commit: {us:6.1f} us CPU per row"
                     for store, us in result.items())


def table(result: dict[str, Any]) -> str:
    db = result.get("database_cpus")
    lines = [
        f"server load ({result['date']}, {result['machine']}; server on CPU {result['server_cpus']}, "
        f"load on {result['load_cpus']}" + (f", PostgreSQL on {db}" if db is not None else "")
        + f"; {result['duration_s']:g} s per cell, median of {result['rounds']} round(s))",
        f"{'server':<20}{'in flight':>10}{'QPS':>9}{'x floor':>9}{'p50 ms':>9}{'p99 ms':>9}{'p99 x floor':>13}"
        f"{'CPU us/call':>13}{'of it DB':>10}{'CPU x floor':>13}{'switches/call':>15}",
    ]
    names = {"echo": "grpcio floor", "echo-aio": "grpcio aio echo", "echo-interceptors": "echo+intercept.",
             "echo-busy": f"echo+{result.get('busy_us') or 0:g}us Python", "echo-stream": "echo, a stream",
             "sqlite": "regulator SQLite", "sqlite-stream": "SQLite, a stream", "postgresql": "regulator PostgreSQL",
             "postgresql-stream": "PostgreSQL, a stream", "memory": "regulator memory", "memory-stream": "memory, a stream",
             "baseline": "baseline SQLite"}
    for row in sorted(result["rows"], key=lambda r: (SERVERS.index(r["server"]), r["in_flight"])):
        lines.append(
            f"{names[row['server']]:<20}{row['in_flight']:>10}{row['qps']:>9.0f}{row.get('qps_vs_floor', float('nan')):>9.2f}"
            f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row.get('p99_vs_floor', float('nan')):>13.2f}"
            f"{row.get('server_us_per_call') or float('nan'):>13.0f}"
            + (f"{row['db_us_per_call']:>10.0f}" if row.get("db_us_per_call") is not None else f"{'':>10}")
            + f"{row.get('cpu_vs_floor', float('nan')):>13.2f}"
            + f"{row.get('switches_per_call') or float('nan'):>15.1f}"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.server_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="in-flight counts")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--servers", nargs="+", choices=[s for s in SERVERS if s != "baseline"],
                   default=["echo", "sqlite", "memory"],
                   help="echo-aio: the trivial server on grpc.aio (the floor stays the synchronous echo); "
                        "echo-interceptors: the floor behind the regulator's interceptors; echo-busy: the floor "
                        "plus --busy-us of pure-Python CPU per call; echo-stream: Reports as messages of one "
                        "ReportStream per client, answered canned; sqlite-stream, memory-stream, postgresql-stream: "
                        "the regulator answering such streams; postgresql: the regulator on a throwaway PostgreSQL "
                        "cluster (its CPU counted as the server's)")
    p.add_argument("--busy-us", type=float, default=DEFAULT_BUSY_US, metavar="US",
                   help=f"pure-Python CPU per call of echo-busy (default {DEFAULT_BUSY_US:g})")
    p.add_argument("--in-process", type=int, metavar="N", default=0,
                   help="instead: the Report's own CPU time, N Reports called in this process without gRPC")
    p.add_argument("--baseline", metavar="CHECKOUT", default=None,
                   help="also measure the SQLite server of another checkout, e.g. `git worktree add /tmp/before "
                        "ac79999` (with --in-process: its Report alone)")
    p.add_argument("--database-cpus", choices=DATABASE_PLACES, default="apart",
                   help="where the PostgreSQL cluster runs: apart (default) on the load's CPUs, as a database "
                        "runs on a machine of its own, or on the server's CPU beside the regulator; its CPU time "
                        "is counted with the server's either way")
    p.add_argument("--json", default=None, help="also write the result here")
    # internal: the processes the benchmark starts
    p.add_argument("--serve-echo", metavar="READY_FILE", help=argparse.SUPPRESS)
    p.add_argument("--serve-echo-aio", metavar="READY_FILE", help=argparse.SUPPRESS)
    p.add_argument("--serve-echo-interceptors", metavar="READY_FILE", help=argparse.SUPPRESS)
    p.add_argument("--serve-echo-busy", metavar="READY_FILE", help=argparse.SUPPRESS)
    p.add_argument("--serve-echo-stream", metavar="READY_FILE", help=argparse.SUPPRESS)
    p.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--emit-json", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--load", metavar="TARGET", help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return 0
    if args.serve_echo_aio:
        serve_echo_aio(args.serve_echo_aio)
        return 0
    if args.serve_echo_interceptors:
        serve_echo(args.serve_echo_interceptors, interceptors=True)
        return 0
    if args.serve_echo_busy:
        serve_echo(args.serve_echo_busy, busy_us=args.busy_us)
        return 0
    if args.serve_echo_stream:
        serve_echo(args.serve_echo_stream, stream=True)
        return 0
    if args.in_process:
        if args.emit_json:
            print(json.dumps(in_process(args.in_process)))
            return 0
        print(in_process_table({**in_process(args.in_process), "sqlite_rows": sqlite_rows(16 * args.in_process)}))
        if args.baseline:
            print(in_process_table(in_process_of(args.baseline, args.in_process), "baseline "))
        return 0
    if args.load:
        print(json.dumps(load(args.load, args.clients, args.duration, args.warmup, args.stream)))
        return 0
    if args.busy_us < 0:
        p.error("--busy-us must be >= 0")
    result = run(args.concurrency, args.duration, args.warmup, args.rounds, args.servers, baseline=args.baseline,
                 busy_us=args.busy_us, database=args.database_cpus)
    # imported here: ``in_process_of`` runs this file as a plain script (no package) beside
    # another checkout's packages, and that path must not need the bench package
    from bench.output import emit

    return emit(result, table(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
