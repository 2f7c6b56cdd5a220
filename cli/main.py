"""``regulator``: run the server, replay traces, inspect sessions.

Every mistake a user can make on the command line ends in one line on stderr, never a
traceback: ``regulator CMD: CODE: message`` with exit code 1 for what the regulator (or the
network) answered, ``regulator CMD: message`` with exit code 2 for what is wrong on this side
(a flag, a file, a token too short), as argparse's own usage errors.

Nothing that imports ``grpc`` is imported at module level: gRPC core reads its log settings
once, on import, and a client command keeps them quiet (``grpc_env``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from types import ModuleType
from typing import Optional, Sequence

from .commands.serve_missing import ServeMissing, is_missing_server_extra
from .grpc_env import quiet_grpc_core

DEFAULT_LOG_LEVEL = "INFO"
log = logging.getLogger("regulator")


def subcommands() -> tuple[ModuleType | ServeMissing, ...]:
    """The modules that add a subcommand each (``add_parser(sub)``, ``set_defaults(func=...)``).
    In a client-only install (no [server] extra) ``serve`` is a stand-in that says what to install."""
    from .commands import inspect, migrate, plot, replay

    try:
        from regulator_service import serve
    except ModuleNotFoundError as exc:
        if not is_missing_server_extra(exc):
            raise
        return (ServeMissing(exc), replay, inspect, plot, migrate)
    return (serve, replay, inspect, plot, migrate)


def _log_level_flag(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--log-level", default=default, metavar="LEVEL",
        help=f"logging level: DEBUG, INFO, WARNING, ERROR (default {DEFAULT_LOG_LEVEL})",
    )


def build_parser() -> argparse.ArgumentParser:
    from regulator_service import __version__

    parser = argparse.ArgumentParser(prog="regulator", description="InfoReg regulation service")
    parser.add_argument("--version", action="version", version=f"regulator {__version__}")
    _log_level_flag(parser, DEFAULT_LOG_LEVEL)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in subcommands():
        module.add_parser(sub)
    # `regulator serve --log-level DEBUG` as well as `regulator --log-level DEBUG serve`: the
    # subcommand's copy only overrides when given (SUPPRESS leaves the top-level value alone).
    for command in sub.choices.values():
        _log_level_flag(command, argparse.SUPPRESS)
    return parser


def log_level(name: str) -> int:
    level = logging.getLevelName(str(name).upper())
    if not isinstance(level, int):
        raise ValueError(f"--log-level {name!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def one_line(text: object) -> str:
    """A message as one line: gRPC's details and OS errors may carry newlines."""
    return " ".join(str(text).split())


def run_command(args: argparse.Namespace) -> int:
    """``args.func(args)``, with every expected failure turned into one line on stderr."""
    from regulator_service.errors import RegulatorError

    from .connection import FlagError

    name = f"regulator {args.command}"
    try:
        return int(args.func(args))
    except RegulatorError as exc:  # the regulator's (or the network's) answer
        print(f"{name}: {exc.code.name}: {one_line(exc.message)}", file=sys.stderr)
        return 1
    except FlagError as exc:
        print(f"{name}: {one_line(exc)}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # a client-side mistake no check above foresaw
        log.debug("%s failed", name, exc_info=True)  # --log-level DEBUG shows where
        print(f"{name}: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_grpc_core(argv, os.environ)  # before anything imports grpc
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        level = log_level(args.log_level)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
