"""``regulator``: run the server, replay traces, inspect sessions."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from regulator_service import serve
from regulator_service.errors import RegulatorError

from .commands import inspect, plot, replay

SUBCOMMANDS = (serve, replay, inspect, plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regulator", description="InfoReg regulation service")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except RegulatorError as exc:
        print(f"regulator {args.command}: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
