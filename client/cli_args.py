"""Command-line flags for reaching a regulator: one definition for `regulator sessions/show/
export/plot` and the example trainers. Unset flags fall back to the environment through the
transport (REGULATOR_TARGET, REGULATOR_TOKEN, REGULATOR_TOKEN_FILE)."""

from __future__ import annotations

import argparse
from typing import Any, Optional

from .client import RegulatorClient
from .transport import TlsConfig


def add_connection_flags(
    p: argparse.ArgumentParser,
    *,
    timeout_flag: str = "--timeout",
    default_timeout: float = 30.0,
    target_help: str = "HOST:PORT or unix:PATH of the regulator (default: $REGULATOR_TARGET, else 127.0.0.1:50051)",
) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--target", default=None, help=target_help)
    g.add_argument(
        "--token", default=None,
        help="bearer token (default: $REGULATOR_TOKEN, else the file $REGULATOR_TOKEN_FILE; prefer those: a flag shows in ps)",
    )
    g.add_argument(timeout_flag, type=float, default=default_timeout, help=f"deadline per call, seconds (default {default_timeout:g})")
    g.add_argument("--tls-ca", default=None, help="use TLS, trusting this CA (PEM); without it: plaintext")
    g.add_argument("--tls-cert", default=None, help="client certificate for mutual TLS (PEM, with --tls-key)")
    g.add_argument("--tls-key", default=None, help="client key for mutual TLS (PEM)")


def tls_from_args(args: argparse.Namespace) -> Optional[TlsConfig]:
    if args.tls_ca or args.tls_cert or args.tls_key:
        return TlsConfig(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    return None


def connect_from_args(args: argparse.Namespace, timeout: float, target: Optional[str] = None, **options: Any) -> RegulatorClient:
    """A client for the flags; ``target`` overrides ``--target`` (already resolved by the caller)."""
    return RegulatorClient.connect(target or args.target, token=args.token, tls=tls_from_args(args), timeout=timeout, **options)
