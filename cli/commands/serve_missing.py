"""``regulator serve`` in a client-only install: one line that says which extra to install.

The client (``pip install inforeg-regulator``) leaves out the server's packages (gRPC health and
reflection, the Prometheus client); they come with the ``server`` extra. Every other ``regulator``
command works without them, so only ``serve`` is replaced, by this stand-in.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

# The server's imports that a client-only install lacks (the [server] extra of pyproject.toml).
SERVER_ONLY = frozenset({"grpc_health", "grpc_reflection", "prometheus_client"})
INSTALL_HINT = "pip install 'inforeg-regulator[server]' (from a checkout: pip install '.[server]')"


def is_missing_server_extra(exc: ModuleNotFoundError) -> bool:
    """Whether an import failed for lack of the [server] extra (anything else is a real bug)."""
    return (exc.name or "").split(".")[0] in SERVER_ONLY


class ServeMissing:
    """The ``serve`` subcommand standing in for ``regulator_service.serve`` (``add_parser``)."""

    def __init__(self, exc: ModuleNotFoundError) -> None:
        self.missing = (exc.name or "").split(".")[0]

    def add_parser(self, sub: argparse._SubParsersAction) -> None:
        s = sub.add_parser("serve", help=f"run the gRPC regulator (needs the server extra: {INSTALL_HINT})")
        # Any serve flags are accepted unread: the answer is the same one line whatever they are
        # (argparse's REMAINDER cannot take a leading --flag, so the parse itself is replaced).
        def parse_known_args(args: Optional[Sequence[str]] = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
            return argparse.Namespace(func=self.run), []

        s.parse_known_args = parse_known_args  # type: ignore[method-assign]

    def run(self, args: argparse.Namespace) -> int:
        from ..connection import FlagError

        raise FlagError(f"the server's packages are not installed ({self.missing} is missing): {INSTALL_HINT}")
