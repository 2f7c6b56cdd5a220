"""``regulator replay``: feed a statistics trace through a regulator and print its answers."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any, Optional

from regulator_client import RegulatorClient
from regulator_client.trace import TraceError, read_trace, replay_events
from regulator_service.server import RegulatorServer, ServerConfig

PROFILE_FLAGS = {
    # parameter -> (type, profiles it belongs to)
    "beta": (float, ("paper",)),
    "threshold": (float, ("paper", "official")),
    "warmup_epochs": (int, ("paper",)),
    "reference_modality": (str, ("official",)),
    "history": (int, ("official",)),
    "reference_gain": (float, ("official",)),
    "other_gain": (float, ("official",)),
}


def add_profile_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=("paper", "official", "none"), default="paper", help="regulation profile (default: paper)")
    g = p.add_argument_group("profile parameters (unset = the documented defaults)")
    for name, (kind, profiles) in PROFILE_FLAGS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"({'/'.join(profiles)})")


def profile_params(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for name, (_, profiles) in PROFILE_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.profile not in profiles:
            raise SystemExit(f"regulator: --{name.replace('_', '-')} does not apply to profile {args.profile!r}")
        out[name] = value
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("replay", help="replay a statistics trace and print the factors per step")
    r.add_argument("trace", help="trace file (JSON lines, see trace-format.md)")
    r.add_argument("--target", default=None, help="HOST:PORT of a running regulator (default: start one)")
    r.add_argument("--job-id", default=None, help="session id to use (default: replay-<uuid>)")
    r.add_argument("-o", "--output", default="-", help="output file (default stdout)")
    r.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    add_profile_flags(r)
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        header, events = read_trace(args.trace)
    except (OSError, TraceError) as exc:
        print(f"regulator replay: {args.trace}: {exc}", file=sys.stderr)
        return 2
    params = profile_params(args)
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
