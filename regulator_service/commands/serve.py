"""``regulator serve``: run the gRPC regulator until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from pathlib import Path

from ..manager import Limits
from ..server import RegulatorServer, ServerConfig

log = logging.getLogger("regulator")


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="run the gRPC regulator")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    s.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one and prints it")
    s.add_argument("--metrics-host", default=None, help="metrics address (default: --host)")
    s.add_argument("--metrics-port", type=int, default=9464, help="Prometheus port; 0 = free port, -1 = off")
    s.add_argument("--state-dir", default=".regulator", help="directory of the SQLite state file")
    s.add_argument("--in-memory", action="store_true", help="keep state in memory only (lost on exit)")
    s.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on SIGTERM")
    s.add_argument("--max-sessions", type=int, default=1024, help="open sessions before RESOURCE_EXHAUSTED")
    s.add_argument("--max-modalities", type=int, default=16, help="modalities per session")
    s.add_argument("--metrics-max-jobs", type=int, default=100, help="jobs with per-job metric series")
    s.add_argument("--max-workers", type=int, default=16, help="gRPC worker threads")
    s.add_argument("--ready-file", default=None, help="write {port, metrics_port, pid} as JSON once serving")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = ServerConfig(
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host or args.host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        state_dir=None if args.in_memory else Path(args.state_dir),
        grace_seconds=args.grace,
        max_workers=args.max_workers,
        limits=Limits(max_open_sessions=args.max_sessions, max_modalities=args.max_modalities),
        metrics_max_jobs=args.metrics_max_jobs,
    )
    server = RegulatorServer(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server.start()
    state = "in memory" if config.state_dir is None else str(config.state_dir / "regulator.sqlite3")
    metrics = f"http://{config.metrics_host}:{server.metrics_port}/metrics" if server.metrics_port else "off"
    print(f"regulator serving on {config.host}:{server.port} (metrics {metrics}, state {state})", flush=True)
    if args.ready_file:
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_text(json.dumps({"port": server.port, "metrics_port": server.metrics_port, "pid": os.getpid()}))
        tmp.replace(args.ready_file)
    stop.wait()
    log.info("shutting down: draining in-flight calls (grace %.1fs)", config.grace_seconds)
    server.stop()
    log.info("state flushed; bye")
    return 0
