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
import sys
import threading
from pathlib import Path
from typing import Mapping, Optional

from prometheus_client import disable_created_metrics

from .capacity.memory_budget import parse_bytes
from .model import Limits
from .wire.profile_wire import load_registry
from .edge.security import TlsFiles, TokenSource
from .edge.server import RegulatorServer, ServerConfig
from .edge.tenants import Tenants
from .storage import StoreError
from .storage.sqlite import STATE_FILE

log = logging.getLogger("regulator")
ENV_PREFIX = "REGULATOR_"
# A long-running server expires sessions idle for a day (library servers default to never).
DEFAULT_SESSION_TTL_S = 86400.0
DEFAULT_STEP_RETENTION_S = 30 * 86400.0  # a month of every step of ended jobs; epochs stay forever
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
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a pod)")
    s.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051); 0 picks a free one and prints it")
    s.add_argument("--metrics-host", default=None, help="metrics address (default: --host)")
    s.add_argument("--metrics-port", type=int, default=9464, help="Prometheus port (default 9464); 0 = free port, -1 = off")
    s.add_argument(
        "--metrics-token-file", default=None,
        help="require 'Authorization: Bearer <token>' on /metrics, token read from this file (re-read when it changes)",
    )
    s.add_argument("--metrics-tls-cert", default=None, help="serve /metrics over HTTPS with this certificate chain (PEM, reloaded when it changes)")
    s.add_argument("--metrics-tls-key", default=None, help="private key of --metrics-tls-cert (PEM)")
    s.add_argument("--metrics-tls-client-ca", default=None, help="require scrapers to present a client certificate signed by this CA")
    s.add_argument("--health-port", type=int, default=-1, help="plaintext port serving only grpc.health.v1, for kubelet probes (-1 = off)")
    s.add_argument(
        "--health-host", default=None,
        help="address of --health-port (default: --host); a sidecar serves RPCs on 127.0.0.1 and probes on 0.0.0.0",
    )
    s.add_argument("--uds", default=None, help="also listen on this Unix domain socket path (plaintext)")
    s.add_argument("--state-dir", default=".regulator", help="directory of the SQLite state file (default .regulator)")
    s.add_argument("--in-memory", action="store_true", help="keep state in memory only (lost on exit)")
    s.add_argument(
        "--store", default=None, metavar="DSN",
        help="keep state in PostgreSQL instead of --state-dir: postgresql://USER@HOST:PORT/DATABASE "
        "(password from ~/.pgpass or PGPASSWORD; docs/operations.md, PostgreSQL store)",
    )
    s.add_argument(
        "--lease-ttl", type=float, default=_SERVER.lease_ttl_s, metavar="SECONDS",
        help="with --store: several replicas may share the database; a job is served by one replica at a time "
        "under a lease this long, renewed while it serves the job; a dead replica's jobs move after it lapses "
        f"(default {_SERVER.lease_ttl_s:g}; docs/operations.md, Several replicas)",
    )
    s.add_argument("--token-file", default=None, help="require this bearer token (file, re-read when it changes); or set REGULATOR_TOKEN")
    s.add_argument(
        "--tenants", default=None, metavar="FILE",
        help="serve several teams: a YAML file of tenants, each with its identities (token_file, client_cert_san) "
        "and its job_prefix; replaces --token-file; re-read when it or its token files change (docs/operations.md, Tenants)",
    )
    s.add_argument("--tls-cert", default=None, help="server certificate chain (PEM); enables TLS")
    s.add_argument("--tls-key", default=None, help="server private key (PEM)")
    s.add_argument("--tls-client-ca", default=None, help="CA bundle for client certificates; enables mutual TLS")
    s.add_argument("--grace", type=float, default=_SERVER.grace_seconds, help=f"seconds in-flight calls get on SIGTERM (default {_SERVER.grace_seconds:g})")
    s.add_argument("--max-sessions", type=int, default=_LIMITS.max_open_sessions, help=f"open sessions before RESOURCE_EXHAUSTED (default {_LIMITS.max_open_sessions})")
    s.add_argument("--max-modalities", type=int, default=_LIMITS.max_modalities, help=f"modalities per session (default {_LIMITS.max_modalities})")
    s.add_argument("--max-message-bytes", type=int, default=_SERVER.max_receive_bytes, help=f"largest request accepted, bytes (default {_SERVER.max_receive_bytes})")
    s.add_argument("--session-ttl", type=float, default=DEFAULT_SESSION_TTL_S, help=f"expire open sessions idle this many seconds (default {DEFAULT_SESSION_TTL_S:g}: a day; 0 = never)")
    s.add_argument(
        "--memory-budget", type=size, default=_LIMITS.memory_budget, metavar="BYTES",
        help="bytes the session caches may hold (e.g. 256Mi, 1Gi); beyond it caches are evicted, then new "
        f"sessions refused (default {_LIMITS.memory_budget >> 20}Mi; the process needs about 50 MB more, plus messages in flight: docs/performance.md, Memory budget)",
    )
    s.add_argument(
        "--step-retention", type=float, default=DEFAULT_STEP_RETENTION_S, metavar="SECONDS",
        help="prune the step records of sessions ended this long ago, keeping epochs and windows "
        "(default 30 days; 0 = keep forever)",
    )
    s.add_argument(
        "--store-timeout", type=float, default=_LIMITS.store_timeout_s, metavar="SECONDS",
        help=f"a state store call that takes longer is answered UNAVAILABLE (a hung or locked disk; default {_LIMITS.store_timeout_s:g})",
    )
    s.add_argument(
        "--history-read-rate", type=size_or_off, default=_LIMITS.history_read_rate, metavar="BYTES",
        help="bytes per second that history pages (GetSession with steps: show --steps, export) are sent at most, "
        f"so that readers never take the CPU Reports need (e.g. 32Mi; 0 = unpaced; default {_LIMITS.history_read_rate >> 20}Mi)",
    )
    s.add_argument(
        "--max-history-readers", type=int, default=_LIMITS.max_history_readers, metavar="N",
        help="paged history reads at once; one more is RESOURCE_EXHAUSTED at once and retried by the client "
        f"(0 = unbounded; default {_LIMITS.max_history_readers})",
    )
    s.add_argument("--metrics-max-jobs", type=int, default=_SERVER.metrics_max_jobs, help=f"jobs with per-job metric series (default {_SERVER.metrics_max_jobs})")
    s.add_argument("--max-workers", type=int, default=_SERVER.max_workers, help=f"gRPC worker threads (default {_SERVER.max_workers})")
    s.add_argument(
        "--max-concurrent-rpcs", type=int, default=_SERVER.max_concurrent_rpcs,
        help=f"RPCs admitted at once (running or queued); beyond it calls are shed with RESOURCE_EXHAUSTED, "
        f"which clients retry with backoff (default {_SERVER.max_concurrent_rpcs}; 0 = unbounded)",
    )
    s.add_argument(
        "--max-streams", type=int, default=_SERVER.max_streams, metavar="N",
        help="Report streams open at once, each holding a worker thread of its own beside --max-workers; "
        f"one more is refused with RESOURCE_EXHAUSTED and its client sends unary Reports (0 = no streams; default {_SERVER.max_streams})",
    )
    s.add_argument(
        "--max-pending-calls", type=int, default=_SERVER.max_pending_calls, metavar="N",
        help="calls grpc core queues before admission takes them (a burst beyond it is CANCELLED by grpc "
        f"itself, uncounted; default {_SERVER.max_pending_calls})",
    )
    s.add_argument(
        "--plugin", action=PluginAction, default=[], metavar="MODULE",
        help="load the profiles a module (or .py file) declares in INFOREG_PROFILES; repeatable "
        "(REGULATOR_PLUGIN: comma-separated)",
    )
    s.add_argument("--ready-file", default=None, help="write {port, metrics_port, health_port, pid} as JSON once serving")
    s.add_argument("--debug-delay", type=float, default=0.0, help="fault injection: delay every Regulator RPC by this many seconds")
    s.add_argument(
        "--debug-hold-file", default=None, metavar="PATH",
        help="fault injection: every Regulator RPC, once admitted, waits while this file exists (up to its deadline); "
        "drills and tests hold calls for exactly as long as they need",
    )
    s.add_argument(
        "--debug-max-state-bytes", type=size, default=None, metavar="BYTES",
        help="fault injection: the state file stops growing at this size, as on a full disk",
    )
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
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{ENV_PREFIX}{action.dest.upper()}={raw!r} is not a valid {action.option_strings[0]} ({exc})")
    parser.set_defaults(**defaults)


def size(text: str) -> int:
    """A byte count flag ('256Mi', '1Gi', '1048576'): argparse shows what a size looks like."""
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size_or_off(text: str) -> int:
    """A byte count flag where 0 turns the thing off."""
    return 0 if text.strip() == "0" else size(text)


def _check_port(flag: str, port: int, off: bool) -> None:
    """gRPC takes a port above 65535 modulo 65536 (--port 99999 listened on 34463): refuse it."""
    low = -1 if off else 0
    if not low <= port <= 65535:
        raise ValueError(f"{flag} must be a port, 0 to 65535{' (-1 = off)' if off else ''}, got {port}")


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


def _tls_files(cert: Optional[str], key: Optional[str], client_ca: Optional[str], flag: str) -> Optional[TlsFiles]:
    if cert or key:
        if not (cert and key):
            raise ValueError(f"--{flag}-cert and --{flag}-key go together")
        return TlsFiles(Path(cert), Path(key), Path(client_ca) if client_ca else None)
    if client_ca:
        raise ValueError(f"--{flag}-client-ca needs --{flag}-cert and --{flag}-key")
    return None


def _tenants(path: Optional[str], token: Optional[TokenSource], tls: Optional[TlsFiles]) -> Optional[Tenants]:
    """The --tenants file, loaded and checked now (a mistake is one line at startup)."""
    if not path:
        return None
    if token is not None:
        raise ValueError("--tenants replaces the single bearer token: drop --token-file / REGULATOR_TOKEN")
    tenants = Tenants(Path(path))
    certified = [t.name for t in tenants.table().tenants if t.sans]
    if certified and (tls is None or tls.client_ca is None):
        raise ValueError(f"--tenants: {certified} are identified by client_cert_san, which needs mutual TLS (--tls-client-ca)")
    return tenants


def _store_dsn(dsn: Optional[str], in_memory: bool) -> Optional[str]:
    """The --store DSN, checked now (a mistake is one line at startup)."""
    if not dsn:
        return None
    if in_memory:
        raise ValueError("--store and --in-memory exclude each other")
    try:
        from .storage.pg_schema import check_dsn
    except ImportError as exc:
        raise ValueError(f"--store needs psycopg 3 (pip install 'inforeg-regulator[server]'): {exc}") from None
    return check_dsn(dsn)


def config_from_args(args: argparse.Namespace, env: Optional[Mapping[str, str]] = None) -> ServerConfig:
    """The server's configuration; ValueError names the flag that is wrong."""
    env = os.environ if env is None else env
    token: Optional[TokenSource] = None
    if args.token_file:
        token = TokenSource(path=Path(args.token_file))
    elif env.get(ENV_PREFIX + "TOKEN"):
        token = TokenSource(token=env[ENV_PREFIX + "TOKEN"])
    tls = _tls_files(args.tls_cert, args.tls_key, args.tls_client_ca, "tls")
    tenants = _tenants(args.tenants, token, tls)
    metrics_tls = _tls_files(args.metrics_tls_cert, args.metrics_tls_key, args.metrics_tls_client_ca, "metrics-tls")
    metrics_token = TokenSource(path=Path(args.metrics_token_file)) if args.metrics_token_file else None
    _check_port("--port", args.port, off=False)
    _check_port("--metrics-port", args.metrics_port, off=True)
    _check_port("--health-port", args.health_port, off=True)
    if args.health_host and args.health_port < 0:
        raise ValueError("--health-host needs --health-port")
    if args.store_timeout <= 0:
        raise ValueError(f"--store-timeout must be > 0, got {args.store_timeout}")
    store_dsn = _store_dsn(args.store, args.in_memory)
    if not args.lease_ttl > 0:
        raise ValueError(f"--lease-ttl must be > 0 seconds, got {args.lease_ttl}")
    if args.step_retention < 0:
        raise ValueError(f"--step-retention must be >= 0 (0 = keep forever), got {args.step_retention}")
    if args.max_concurrent_rpcs < 0:
        raise ValueError(f"--max-concurrent-rpcs must be >= 0, got {args.max_concurrent_rpcs}")
    if args.max_streams < 0:
        raise ValueError(f"--max-streams must be >= 0 (0 = streams refused), got {args.max_streams}")
    if args.max_pending_calls < 1:
        raise ValueError(f"--max-pending-calls must be >= 1, got {args.max_pending_calls}")
    if args.max_history_readers < 0:
        raise ValueError(f"--max-history-readers must be >= 0 (0 = unbounded), got {args.max_history_readers}")
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host or args.host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_token=metrics_token,
        metrics_tls=metrics_tls,
        health_port=None if args.health_port < 0 else args.health_port,
        health_host=args.health_host,
        uds=args.uds,
        state_dir=None if args.in_memory or store_dsn else Path(args.state_dir),
        store_dsn=store_dsn,
        lease_ttl_s=args.lease_ttl,
        grace_seconds=args.grace,
        max_workers=args.max_workers,
        max_concurrent_rpcs=args.max_concurrent_rpcs or None,
        max_streams=args.max_streams,
        max_pending_calls=args.max_pending_calls,
        max_receive_bytes=args.max_message_bytes,
        limits=Limits(
            max_open_sessions=args.max_sessions,
            max_modalities=args.max_modalities,
            session_ttl_s=args.session_ttl,
            memory_budget=args.memory_budget,
            step_retention_s=args.step_retention,
            store_timeout_s=args.store_timeout,
            history_read_rate=args.history_read_rate,
            max_history_readers=args.max_history_readers,
        ),
        metrics_max_jobs=args.metrics_max_jobs,
        profiles=load_registry(plugin_list(args.plugin)),
        token=token,
        tenants=tenants,
        tls=tls,
        debug_delay_s=args.debug_delay,
        debug_hold_file=args.debug_hold_file,
        debug_max_state_bytes=args.debug_max_state_bytes,
    )


def run(args: argparse.Namespace) -> int:
    # This process owns its metrics: no `_created` twin for every counter and histogram series.
    disable_created_metrics()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        config = config_from_args(args)
        server = RegulatorServer(config).start()
    except (OSError, ValueError, StoreError) as exc:
        # An operator's mistake (a port taken, a missing file): one line, no traceback.
        print(f"regulator serve: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # anything else at startup: still one line, the detail in the log
        log.debug("startup failed", exc_info=True)
        print(f"regulator serve: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    state = "in memory" if config.state_dir is None else str(config.state_dir / STATE_FILE)
    if config.store_dsn:
        from .storage.pg_schema import where

        state = where(config.store_dsn)
    if server.store_error:
        state += " UNUSABLE (answering UNAVAILABLE; see the log)"
    metrics = (
        f"{server.metrics_scheme}://{config.metrics_host}:{server.metrics_port}/metrics"
        + (", token required" if config.metrics_token else "")
        if server.metrics_port
        else "off"
    )
    extras = "".join(
        [
            f", health port {server.health_host}:{server.health_port}" if server.health_port else "",
            f", socket {config.uds}" if config.uds else "",
            ", TLS" + (" (mutual)" if config.tls and config.tls.client_ca else "") if config.tls else "",
            ", token required" if config.token else "",
            f", tenants {[t.name for t in config.tenants.table().tenants]}" if config.tenants else "",
            f", plugin profiles {[s.name for s in config.profiles.plugins()]}" if config.profiles.plugins() else "",
        ]
    )
    print(f"regulator serving on {config.host}:{server.port} (metrics {metrics}, state {state}{extras})", flush=True)
    if args.ready_file:
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "port": server.port,
                    "metrics_port": server.metrics_port,
                    "health_port": server.health_port,
                    "pid": os.getpid(),
                }
            )
        )
        tmp.replace(args.ready_file)
    # Timed waits: a SIGTERM the kernel hands to another thread (grpc's, the committer's) only sets
    # Python's flag; an untimed wait here would never run the handler (seen under load).
    while not stop.wait(0.25):
        pass
    log.info("shutting down: health NOT_SERVING, draining in-flight calls (grace %.1fs)", config.grace_seconds)
    server.stop()
    log.info("state flushed; bye")
    return 0
