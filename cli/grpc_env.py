"""Keep gRPC core's own log lines off a client command's terminal.

gRPC's C core writes its diagnostics straight to file descriptor 2 (``E1207 ...
ssl_transport_security.cc:1517] Could not load any root certificate.``, a handshake failure per
retry, ...). A client command already says what went wrong in one line of its own, so those
lines are noise there; they are read once, when ``grpc`` is imported, so the choice is made
before anything imports it (this module imports nothing that does).

``regulator serve`` keeps gRPC's defaults: on a server the handshake failures of clients are
what an operator needs to see. A ``GRPC_VERBOSITY`` or ``GRPC_TRACE`` the user set always wins.
"""

from __future__ import annotations

import sys
from typing import MutableMapping, Optional, Sequence

# commands whose gRPC core diagnostics stay on (gRPC's defaults)
KEEP_GRPC_LOGS = frozenset({"serve"})
LOG_LEVEL_FLAG = "--log-level"


def command_of(argv: Sequence[str]) -> Optional[str]:
    """The subcommand in ``argv`` (the first word that is neither an option nor the value of
    ``--log-level``, the one top-level option that takes a value), without argparse: this runs
    before the parser exists, and a malformed command line is the parser's to report."""
    words = iter(argv)
    for word in words:
        if word == "--":
            return next(words, None)
        if not word.startswith("-"):
            return word
        # argparse accepts unambiguous prefixes: --log DEBUG, --log-l DEBUG
        if "=" not in word and len(word) > 2 and LOG_LEVEL_FLAG.startswith(word):
            next(words, None)
    return None


def quiet_grpc_core(argv: Sequence[str], env: MutableMapping[str, str]) -> bool:
    """Silence gRPC core's log for a client command; whether it did (False: a server command,
    the user's own ``GRPC_VERBOSITY``, or ``grpc`` already imported, when it is too late)."""
    if command_of(argv) in KEEP_GRPC_LOGS or "grpc" in sys.modules:
        return False
    if "GRPC_VERBOSITY" in env or env.get("GRPC_TRACE"):  # asked for: theirs
        return False
    env["GRPC_VERBOSITY"] = "NONE"
    return True
