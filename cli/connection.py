"""Reaching a regulator from a client command (``sessions``, ``show``, ``export``, ``plot``,
``replay --target``): the connection flags checked before any call, and a failed connection
said in one line with what it most likely means.

What can be checked without the network is checked first, so that a short token or a missing
certificate is a one-line usage error (exit code 2) instead of a traceback from deep inside the
client library; what only the network can tell (nothing listens, TLS on one side only, a
certificate signed by another CA) arrives as ``UNAVAILABLE`` (exit code 1) with a hint appended.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import ssl
from pathlib import Path
from typing import Iterator, Optional, Sequence

from regulator_client import DeadlineExceeded, RegulatorClient, Unavailable
from regulator_client.cli_args import connect_from_args
from regulator_client.errors import Overloaded
from regulator_client.transport import default_target
from regulator_service.edge.security import TokenSource, check_server_identity


class FlagError(Exception):
    """A client-side mistake in the connection flags or their environment defaults: said in one
    line, exit code 2, before any connection is tried."""


def resolve_target(args: argparse.Namespace) -> str:
    return args.target or default_target()


# -- before any call ------------------------------------------------------------------------


def _token_source(args: argparse.Namespace) -> tuple[Optional[str], Optional[str]]:
    """(where the token comes from, its value) as the transport will pick it: ``--token``, else
    ``$REGULATOR_TOKEN``, else the file ``$REGULATOR_TOKEN_FILE``; (None, None): no token."""
    if args.token is not None:
        return ("--token", args.token) if args.token else (None, None)
    if os.environ.get("REGULATOR_TOKEN"):
        return "$REGULATOR_TOKEN", os.environ["REGULATOR_TOKEN"]
    path = os.environ.get("REGULATOR_TOKEN_FILE")
    if path:
        try:
            return f"$REGULATOR_TOKEN_FILE ({path})", Path(path).read_text()
        except OSError as exc:
            raise FlagError(f"$REGULATOR_TOKEN_FILE: cannot read {path}: {exc.strerror or exc}") from None
    return None, None


def check_token(args: argparse.Namespace) -> None:
    where, token = _token_source(args)
    if token is None:
        return
    try:
        TokenSource(token=token)  # the rule the server applies too (at least 16 characters)
    except ValueError as exc:  # the token itself is never printed
        raise FlagError(f"{where}: {exc} (got {len(token.strip())})") from None


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FlagError(f"{flag} {path}: {exc.strerror or exc}") from None


def check_tls(args: argparse.Namespace) -> None:
    """The TLS files exist and hold what they should: gRPC would accept a missing or wrong file
    and fail every handshake later, with a log of its own and a vague error."""
    if bool(args.tls_cert) != bool(args.tls_key):
        given, missing = ("--tls-cert", "--tls-key") if args.tls_cert else ("--tls-key", "--tls-cert")
        raise FlagError(f"{given} needs {missing}: a client certificate and its key go together")
    if args.tls_ca:
        ca = _read("--tls-ca", args.tls_ca)
        try:
            ssl.create_default_context(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise FlagError(f"--tls-ca {args.tls_ca}: not a PEM CA certificate ({getattr(exc, 'reason', None) or exc})") from None
    if args.tls_cert:
        cert, key = _read("--tls-cert", args.tls_cert), _read("--tls-key", args.tls_key)
        try:
            check_server_identity(key, cert)  # the same pairing check as for a server's own pair
        except ValueError as exc:
            raise FlagError(f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: {exc}") from None


def check_connection_flags(args: argparse.Namespace, timeout: Optional[float] = None) -> None:
    """Everything about the connection flags that can go wrong on this side; ``FlagError``."""
    timeout = args.timeout if timeout is None else timeout
    if not timeout > 0:  # NaN too
        raise FlagError(f"--timeout must be > 0 seconds, got {timeout:g}")
    check_token(args)
    check_tls(args)


# -- a failed connection ----------------------------------------------------------------------


def unavailable_hint(message: str, target: str, tls: bool, client_cert: bool = False) -> str:
    """What an UNAVAILABLE most likely means, from gRPC's own words about it."""
    if "WRONG_VERSION_NUMBER" in message:
        return f"the regulator at {target} does not speak TLS (a plaintext server?): drop --tls-ca"
    if "CERTIFICATE_VERIFY_FAILED" in message or "BAD_SIGNATURE" in message or "certificate verify failed" in message:
        return f"the certificate of the regulator at {target} is not signed by --tls-ca"
    if "not in peer certificate" in message or "Peer name" in message:
        return f"the certificate of the regulator at {target} does not name that host"
    if ":" not in target:  # gRPC's default port is 443 (HTTPS), rarely a regulator's
        return f"target {target!r} names no port, so gRPC tried 443; expected HOST:PORT or unix:PATH"
    if "resolving" in message or "DNS resolution failed" in message:
        return f"cannot resolve the host of target {target!r}; expected HOST:PORT or unix:PATH"
    if not tls and ("Socket closed" in message or "Connection reset" in message):
        return f"the regulator at {target} closed the connection: does it serve TLS? then pass --tls-ca"
    if tls and ("Socket closed" in message or "Connection reset" in message or "handshake" in message.lower()):
        if client_cert:
            return f"the regulator at {target} refused the TLS handshake: is --tls-cert signed by the CA it trusts?"
        return f"the regulator at {target} refused the TLS handshake: does it require a client certificate (--tls-cert, --tls-key)?"
    return f"is a regulator serving at {target}?"


@contextlib.contextmanager
def connect(
    args: argparse.Namespace,
    target: Optional[str] = None,
    options: Sequence[tuple[str, object]] = (),
    timeout: Optional[float] = None,
) -> Iterator[RegulatorClient]:
    """A ``RegulatorClient`` for the flags (``target``: already resolved by the caller; the
    transport fills in the environment's defaults); UNAVAILABLE and DEADLINE_EXCEEDED raised in
    the block say which address was tried and what the failure most likely means."""
    timeout = args.timeout if timeout is None else timeout
    check_connection_flags(args, timeout)
    target = target or resolve_target(args)
    tls = bool(args.tls_ca or args.tls_cert)
    with connect_from_args(args, timeout, target, options=list(options)) as client:
        try:
            yield client
        except Overloaded:  # the server answered: it is there, and busy
            raise
        except Unavailable as exc:
            hint = unavailable_hint(exc.message, target, tls, client_cert=bool(args.tls_cert))
            raise Unavailable(f"{exc.message} ({hint})") from exc
        except DeadlineExceeded as exc:
            raise DeadlineExceeded(f"{exc.message} (after {timeout:g}s; a long history may need a larger --timeout)") from exc
