"""``regulator replay``: feed a statistics trace through a regulator and print its answers."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Optional

from regulator_client import RegulatorClient
from regulator_client.profiles import make_profile
from regulator_client.trace import TraceError, read_trace, replay_events
from regulator_service.policy import ProfileError
from regulator_service.server import RegulatorServer, ServerConfig

from ..profile_flags import add_profile_flags, chosen_profile, registry_from_args


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
    try:
        registry = registry_from_args(args)
        spec, params = chosen_profile(args, registry)
        if "reference_modality" in spec.param_names() and "reference_modality" not in params and header.reference_modality:
            params["reference_modality"] = header.reference_modality  # the trace says which
        profile = make_profile(spec.name, registry=registry, **params)
    except (ProfileError, ValueError) as exc:
        print(f"regulator replay: {exc}", file=sys.stderr)
        return 2
    server: Optional[RegulatorServer] = None
    target = args.target
    if target is None:
        server = RegulatorServer(ServerConfig(port=0, metrics_port=None, state_dir=None, profiles=registry)).start()
        target = server.target
    job_id = args.job_id or f"replay-{uuid.uuid4().hex[:12]}"
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    t0 = time.perf_counter()
    steps = 0
    try:
        with RegulatorClient.connect(target, timeout=args.timeout) as client:
            client.open_session(job_id, header.modalities, profile)
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
