"""Command-line flags for reaching a regulator, shared by the example trainers."""

from __future__ import annotations

import argparse

from regulator_client import RegulatorClient
from regulator_client.transport import TlsConfig


def add_connection_flags(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument("--target", default=None, required=required,
                   help="HOST:PORT or unix:PATH of the regulator (default: REGULATOR_TARGET, else 127.0.0.1:50051)")
    p.add_argument("--token", default=None, help="bearer token (default: REGULATOR_TOKEN or REGULATOR_TOKEN_FILE)")
    p.add_argument("--tls-ca", default=None, help="CA of the regulator's certificate (enables TLS)")
    p.add_argument("--tls-cert", default=None, help="client certificate for mutual TLS")
    p.add_argument("--tls-key", default=None, help="client key for mutual TLS")
    p.add_argument("--call-timeout", type=float, default=10.0, help="deadline of one regulator call, seconds")


def connect(args: argparse.Namespace) -> RegulatorClient:
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = TlsConfig(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    return RegulatorClient.connect(args.target, token=args.token, tls=tls, timeout=args.call_timeout)
