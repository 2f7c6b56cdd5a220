"""``regulator serve``: run the gRPC regulator until SIGTERM/SIGINT.

Every flag can also come from the environment as ``REGULATOR_<FLAG>`` (``--state-dir`` ->
``REGULATOR_STATE_DIR``), so a Kubernetes ConfigMap works with ``envFrom``; the bearer token
itself may be given as ``REGULATOR_TOKEN`` (never as a flag: it would show in ``ps``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Mapping, Optional

from prometheus_client import disable_created_metrics

from .model import Limits
from .profile_wire import load_registry
from .security import TlsFiles, TokenSource
from .server import RegulatorServer, ServerConfig
from .storage.sqlite import STATE_FILE

log = logging.getLogger("regulator")
ENV_PREFIX = "REGULATOR_"
# A long-running server expires sessions idle for a day (library servers default to never).
DEFAULT_SESSION_TTL_S = 86400.0
_LIMITS = Limits()
_SERVER = ServerConfig()


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_arguments(
        sub.add_parser(
            "serve",
            help="run the gRPC regulator",
            description="Run the regulator. Every flag may also be set as REGULATOR_<FLAG> in the environment.",
        )
    )


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The serve flags, with REGULATOR_<FLAG> environment defaults."""
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    s.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one and prints it")
    s.add_argument("--metrics-host", default=None, help="metrics address (default: --host)")
    s.add_argument("--metrics-port", type=int, default=9464, help="Prometheus port; 0 = free port, -1 = off")
    s.add_argument("--health-port", type=int, default=-1, help="plaintext port serving only grpc.health.v1, for kubelet probes (-1 = off)")
    s.add_argument("--uds", default=None, help="also listen on this Unix domain socket path (plaintext)")
    s.add_argument("--state-dir", default=".regulator", help="directory of the SQLite state file")
    s.add_argument("--in-memory", action="store_true", help="keep state in memory only (lost on exit)")
    s.add_argument("--token-file", default=None, help="require this bearer token (file, re-read when it changes); or set REGULATOR_TOKEN")
    s.add_argument("--tls-cert", default=None, help="server certificate chain (PEM); enables TLS")
    s.add_argument("--tls-key", default=None, help="server private key (PEM)")
    s.add_argument("--tls-client-ca", default=None, help="CA bundle for client certificates; enables mutual TLS")
    s.add_argument("--grace", type=float, default=_SERVER.grace_seconds, help="seconds in-flight calls get on SIGTERM")
    s.add_argument("--max-sessions", type=int, default=_LIMITS.max_open_sessions, help="open sessions before RESOURCE_EXHAUSTED")
    s.add_argument("--max-modalities", type=int, default=_LIMITS.max_modalities, help="modalities per session")
    s.add_argument("--max-message-bytes", type=int, default=_SERVER.max_receive_bytes, help="largest request accepted")
    s.add_argument("--session-ttl", type=float, default=DEFAULT_SESSION_TTL_S, help="expire open sessions idle this many seconds (0 = never)")
    s.add_argument("--metrics-max-jobs", type=int, default=_SERVER.metrics_max_jobs, help="jobs with per-job metric series")
    s.add_argument("--max-workers", type=int, default=_SERVER.max_workers, help="gRPC worker threads")
    s.add_argument(
        "--plugin", action=PluginAction, default=[], metavar="MODULE",
        help="load the profiles a module (or .py file) declares in INFOREG_PROFILES; repeatable "
        "(REGULATOR_PLUGIN: comma-separated)",
    )
    s.add_argument("--ready-file", default=None, help="write {port, metrics_port, health_port, pid} as JSON once serving")
    s.add_argument("--debug-delay", type=float, default=0.0, help="fault injection: delay every Regulator RPC by this many seconds")
    apply_env_defaults(s)
    s.set_defaults(func=run)


def apply_env_defaults(parser: argparse.ArgumentParser, env: Optional[Mapping[str, str]] = None) -> None:
    """REGULATOR_<DEST> overrides each flag's default (typed like the flag; '1/true/yes' for switches)."""
    env = os.environ if env is None else env
    defaults = {}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        raw = env.get(ENV_PREFIX + action.dest.upper())
        if raw is None:
            continue
        if raw.startswith(("tcp://", "udp://")):
            # Kubernetes service links: a Service named "regulator" sets REGULATOR_PORT=tcp://...
            log.warning(
                "ignoring %s%s=%s: a Kubernetes service link, not a setting (set enableServiceLinks: false)",
                ENV_PREFIX, action.dest.upper(), raw,
            )
            continue
        if isinstance(action, argparse._StoreTrueAction):
            defaults[action.dest] = raw.strip().lower() in ("1", "true", "yes", "on")
        else:
            try:
                defaults[action.dest] = action.type(raw) if action.type else raw
            except ValueError:
                parser.error(f"{ENV_PREFIX}{action.dest.upper()}={raw!r} is not a valid {action.option_strings[0]}")
    parser.set_defaults(**defaults)


class PluginAction(argparse.Action):
    """Appends to the plugin list; a REGULATOR_PLUGIN default arrives as one comma-separated string."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, [*plugin_list(getattr(namespace, self.dest, None)), values])


def plugin_list(value: object) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)  # type: ignore[call-overload]


def config_from_args(args: argparse.Namespace, env: Optional[Mapping[str, str]] = None) -> ServerConfig:
    env = os.environ if env is None else env
    token: Optional[TokenSource] = None
    if args.token_file:
        token = TokenSource(path=Path(args.token_file))
    elif env.get(ENV_PREFIX + "TOKEN"):
        token = TokenSource(token=env[ENV_PREFIX + "TOKEN"])
    tls: Optional[TlsFiles] = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("regulator serve: --tls-cert and --tls-key go together")
        tls = TlsFiles(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_client_ca) if args.tls_client_ca else None)
    elif args.tls_client_ca:
        raise SystemExit("regulator serve: --tls-client-ca needs --tls-cert and --tls-key")
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host or args.host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        health_port=None if args.health_port < 0 else args.health_port,
        uds=args.uds,
        state_dir=None if args.in_memory else Path(args.state_dir),
        grace_seconds=args.grace,
        max_workers=args.max_workers,
        max_receive_bytes=args.max_message_bytes,
        limits=Limits(
            max_open_sessions=args.max_sessions,
            max_modalities=args.max_modalities,
            session_ttl_s=args.session_ttl,
        ),
        metrics_max_jobs=args.metrics_max_jobs,
        profiles=load_registry(plugin_list(args.plugin)),
        token=token,
        tls=tls,
        debug_delay_s=args.debug_delay,
    )


def run(args: argparse.Namespace) -> int:
    # This process owns its metrics: no `_created` twin for every counter and histogram series.
    disable_created_metrics()
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"regulator serve: {exc}") from None
    server = RegulatorServer(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server.start()
    state = "in memory" if config.state_dir is None else str(config.state_dir / STATE_FILE)
    if server.store_error:
        state += " UNUSABLE (answering UNAVAILABLE; see the log)"
    metrics = f"http://{config.metrics_host}:{server.metrics_port}/metrics" if server.metrics_port else "off"
    extras = "".join(
        [
            f", health port {server.health_port}" if server.health_port else "",
            f", socket {config.uds}" if config.uds else "",
            ", TLS" + (" (mutual)" if config.tls and config.tls.client_ca else "") if config.tls else "",
            ", token required" if config.token else "",
            f", plugin profiles {[s.name for s in config.profiles.plugins()]}" if config.profiles.plugins() else "",
        ]
    )
    print(f"regulator serving on {config.host}:{server.port} (metrics {metrics}, state {state}{extras})", flush=True)
    if args.ready_file:
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_text(
            json.dumps(
                {"port": server.port, "metrics_port": server.metrics_port, "health_port": server.health_port, "pid": os.getpid()}
            )
        )
        tmp.replace(args.ready_file)
    stop.wait()
    log.info("shutting down: health NOT_SERVING, draining in-flight calls (grace %.1fs)", config.grace_seconds)
    server.stop()
    log.info("state flushed; bye")
    return 0
