"""``regulator``: run the server, replay traces, inspect sessions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from .manager import Limits
from .server import RegulatorServer, ServerConfig

log = logging.getLogger("regulator")

PROFILE_FLAGS = {
    # flag -> (profile field, type, profiles it belongs to)
    "beta": (float, ("paper",)),
    "threshold": (float, ("paper", "official")),
    "warmup_epochs": (int, ("paper",)),
    "reference_modality": (str, ("official",)),
    "history": (int, ("official",)),
    "reference_gain": (float, ("official",)),
    "other_gain": (float, ("official",)),
}


def _add_profile_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=("paper", "official", "none"), default="paper", help="regulation profile (default: paper)")
    g = p.add_argument_group("profile parameters (unset = the documented defaults)")
    for name, (kind, profiles) in PROFILE_FLAGS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"({'/'.join(profiles)})")


def _profile_params(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for name, (_, profiles) in PROFILE_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.profile not in profiles:
            raise SystemExit(f"regulator: --{name.replace('_', '-')} does not apply to profile {args.profile!r}")
        out[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regulator", description="InfoReg regulation service")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

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

    r = sub.add_parser("replay", help="replay a statistics trace and print the factors per step")
    r.add_argument("trace", help="trace file (JSON lines, see trace-format.md)")
    r.add_argument("--target", default=None, help="HOST:PORT of a running regulator (default: start one)")
    r.add_argument("--job-id", default=None, help="session id to use (default: replay-<uuid>)")
    r.add_argument("-o", "--output", default="-", help="output file (default stdout)")
    r.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    _add_profile_flags(r)
    return parser


# -- serve --------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
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


# -- replay -------------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from regulator_client import RegulatorClient
    from regulator_client.trace import TraceError, read_trace, replay_events

    try:
        header, events = read_trace(args.trace)
    except (OSError, TraceError) as exc:
        print(f"regulator replay: {args.trace}: {exc}", file=sys.stderr)
        return 2
    params = _profile_params(args)
    if args.profile == "official" and "reference_modality" not in params and header.reference_modality:
        params["reference_modality"] = header.reference_modality
    server: Optional[RegulatorServer] = None
    target = args.target
    if target is None:
        server = RegulatorServer(ServerConfig(port=0, metrics_port=None, state_dir=None)).start()
        target = server.target
    job_id = args.job_id or f"replay-{uuid.uuid4().hex[:12]}"
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    t0 = time.perf_counter()
    steps = 0
    try:
        with RegulatorClient.connect(target, timeout=args.timeout) as client:
            client.open_session(job_id, header.modalities, args.profile, **params)
            for line in replay_events(client, job_id, header, events):
                out.write(json.dumps(line) + "\n")
                steps += 1
            client.close_session(job_id, attempt=0)
    finally:
        if out is not sys.stdout:
            out.close()
        if server is not None:
            server.stop(grace=0)
    where = "an embedded regulator" if args.target is None else target
    print(f"replayed {steps} steps of {args.trace} under {args.profile!r} through {where} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    commands = {"serve": cmd_serve, "replay": cmd_replay}
    from .errors import RegulatorError

    try:
        return commands[args.command](args)
    except RegulatorError as exc:
        print(f"regulator {args.command}: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
