"""``regulator``: run the server, replay traces, inspect sessions."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from regulator_service import __version__, serve
from regulator_service.errors import RegulatorError

from .commands import inspect, plot, replay

SUBCOMMANDS = (serve, replay, inspect, plot)
DEFAULT_LOG_LEVEL = "INFO"


def _log_level_flag(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--log-level", default=default, metavar="LEVEL",
        help=f"logging level: DEBUG, INFO, WARNING, ERROR (default {DEFAULT_LOG_LEVEL})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regulator", description="InfoReg regulation service")
    parser.add_argument("--version", action="version", version=f"regulator {__version__}")
    _log_level_flag(parser, DEFAULT_LOG_LEVEL)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        level = log_level(args.log_level)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except RegulatorError as exc:
        print(f"regulator {args.command}: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
