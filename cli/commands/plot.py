"""``regulator plot JOB -o out.png``: a job's Fisher traces, windows and coefficients at a glance.

The attempts of a job that resumed from a checkpoint are joined on one epoch axis, the resume
marked (``job_history``, ``plot_figure``). matplotlib is an optional dependency: without it the
command says how to install it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client.cli_args import add_connection_flags

from ..job_history import job_history
from .inspect import Progress, add_job_flags, connect


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot", help="plot a job's Fisher traces, windows and coefficients (needs matplotlib)",
        description="Plot one attempt of a job (default: the latest), joined with the attempts it "
        "resumed from a checkpoint, on one epoch axis.",
    )
    add_job_flags(p)
    p.add_argument("-o", "--output", required=True, help="image file; the format follows the suffix (.png, .svg, .pdf)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of raster output (default 100)")
    add_connection_flags(p)
    p.set_defaults(func=run)


def quiet_matplotlib() -> None:
    """matplotlib logs its font-cache housekeeping ("generated new fontManager") at INFO, which
    the CLI's default log level would print on a first run; keep only its warnings, unless the
    user asked for DEBUG."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("matplotlib").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    quiet_matplotlib()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("regulator plot: needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    from ..plot_figure import draw

    with connect(args) as client, Progress(args, "full history") as progress:
        def fetch(attempt: Optional[int]) -> pb.GetSessionResponse:
            return client.get_session(args.job, attempt, include_steps=True, on_page=progress.page)

        history = job_history(client, args.job, args.attempt, fetch)
    s = history.session
    if not history.steps:
        print(
            f"regulator plot: job {s.job_id!r} (attempt {s.attempt}) has no steps yet: nothing to plot",
            file=sys.stderr,
        )
        return 1
    for note in history.notes:
        print(f"regulator plot: note: {note}", file=sys.stderr)
    fig = draw(history)
    try:
        fig.savefig(args.output, dpi=args.dpi)
    except (OSError, ValueError) as exc:  # ValueError: an unknown image format
        print(f"regulator plot: {args.output}: {exc}", file=sys.stderr)
        return 2
    attempts = ", ".join(map(str, history.attempts))
    which = f"attempts {attempts}" if len(history.attempts) > 1 else f"attempt {s.attempt}"
    print(f"plotted {len(history.steps)} steps of job {s.job_id!r} ({which}) to {args.output}", file=sys.stderr)
    return 0
