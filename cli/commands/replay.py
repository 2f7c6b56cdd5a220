"""``regulator replay``: feed a statistics trace through a regulator and print its answers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, ContextManager, Optional

from regulator_client import RegulatorClient
from regulator_client.cli_args import add_connection_flags
from regulator_client.profiles import make_profile
from regulator_client.trace import TraceError, read_trace, replay_events
from regulator_service.policy import ProfileError

from ..connection import FlagError, check_connection_flags, connect
from ..profile_flags import add_profile_flags, chosen_profile, registry_from_args

if TYPE_CHECKING:  # the embedded server needs the [server] extra; a client-only install replays to a target
    from regulator_service.edge.server import RegulatorServer


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("replay", help="replay a statistics trace and print the factors per step")
    r.add_argument("trace", help="trace file (JSON lines, see trace-format.md)")
    r.add_argument("--job-id", default=None, help="session id to use (default: replay-<uuid>)")
    r.add_argument("-o", "--output", default="-", help="output file (default stdout)")
    add_connection_flags(
        r, default_timeout=10.0,
        target_help="HOST:PORT or unix:PATH of a running regulator (default: $REGULATOR_TARGET; "
        "neither: start an embedded one)",
    )
    r.add_argument("--embedded", action="store_true", help="replay through an embedded regulator even if $REGULATOR_TARGET is set")
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
    if args.embedded and args.target:
        raise SystemExit("regulator replay: --embedded and --target exclude each other")
    target = None if args.embedded else args.target or os.environ.get("REGULATOR_TARGET") or None
    if target is not None:
        check_connection_flags(args)  # a short token, a missing certificate: one line, nothing started
    elif not args.timeout > 0:
        raise FlagError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    try:  # before any regulator is started or reached: a bad path is one line, not a traceback
        out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    except OSError as exc:
        print(f"regulator replay: {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    server: Optional[RegulatorServer] = None
    connected: ContextManager[RegulatorClient]
    if target is None:
        from regulator_service.edge.server import RegulatorServer, ServerConfig

        server = RegulatorServer(ServerConfig(port=0, metrics_port=None, state_dir=None, profiles=registry)).start()
        connected = RegulatorClient.connect(server.target, token="", timeout=args.timeout)
    else:
        connected = connect(args, target)
    job_id = args.job_id or f"replay-{uuid.uuid4().hex[:12]}"
    t0 = time.perf_counter()
    steps = 0
    try:
        with connected as client:
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
    where = "an embedded regulator" if server is not None else target
    print(f"replayed {steps} steps of {args.trace} under {args.profile!r} through {where} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return 0
