"""``regulator plot JOB -o out.png``: a session's Fisher traces, windows and coefficients at a glance.

Top: each modality's Fisher trace per closed epoch (log scale), with the epochs its window was
open shaded in its colour (one horizontal band per modality, so that overlapping windows stay
apart). Bottom: the proximal coefficient of every step, epoch boundaries marked.

matplotlib is an optional dependency, imported only here; the figure is drawn through
``matplotlib.figure.Figure`` (Agg canvas), so no pyplot state and no display are involved.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any

from inforeg.regulator.v1 import regulator_pb2 as pb

from regulator_client.cli_args import add_connection_flags

from .inspect import add_job_flags, connect, fetch_session, fmt_profile

MAX_BOUNDARIES = 200  # more epoch lines than this would grey out the panel


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot a session's Fisher traces, windows and coefficients (needs matplotlib)")
    add_job_flags(p)
    p.add_argument("-o", "--output", required=True, help="image file; the format follows the suffix (.png, .svg, .pdf)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of raster output (default 100)")
    add_connection_flags(p)
    p.set_defaults(func=run)


def draw(detail: pb.GetSessionResponse) -> Any:
    """The figure (a ``matplotlib.figure.Figure``) of one session's history."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = detail.session
    mods = list(s.modalities)
    colors = [f"C{i}" for i in range(len(mods))]
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1)
    fig.suptitle(f"{s.job_id} (attempt {s.attempt}) - {fmt_profile(s)}", fontsize=10)

    closed = [e for e in detail.epochs if e.closed]
    band = 1.0 / len(mods)
    for i, (m, c) in enumerate(zip(mods, colors)):
        xs = [e.epoch for e in closed]
        ys = [e.modalities[i].fisher_trace for e in closed]
        top.plot(xs, [y if y > 0 and math.isfinite(y) else math.nan for y in ys], color=c, marker=".", label=m)
        label = f"{m} window open"
        for e in closed:
            if e.modalities[i].window.open:
                top.axvspan(e.epoch - 0.5, e.epoch + 0.5, ymin=i * band, ymax=(i + 1) * band, color=c, alpha=0.15, lw=0, label=label)
                label = None  # one legend entry per modality
    top.set_yscale("log")
    top.set_xlabel("epoch")
    top.set_ylabel("Fisher trace")
    top.set_title("Fisher trace per epoch; shaded: window open (one band per modality)", fontsize=9)
    top.legend(loc="upper right", fontsize=8)
    if closed:
        top.set_xlim(-0.5, closed[-1].epoch + 0.5)

    steps = list(detail.steps)
    xs = [st.step for st in steps]
    for i, (m, c) in enumerate(zip(mods, colors)):
        bottom.plot(xs, [st.modalities[i].factors.proximal for st in steps], color=c, lw=0.8, label=m)
    boundaries = [st.step for prev, st in zip(steps, steps[1:]) if st.epoch != prev.epoch]
    if len(boundaries) > MAX_BOUNDARIES:
        boundaries = []
    for b in boundaries:
        bottom.axvline(b - 0.5, color="0.85", lw=0.5, zorder=0)
    bottom.set_xlabel(f"step ({'grey lines: epoch boundaries; ' if boundaries else ''}{len(steps)} steps)")
    bottom.set_ylabel("proximal coefficient")
    bottom.set_title("coefficient applied per step", fontsize=9)
    bottom.legend(loc="upper right", fontsize=8)
    if steps:
        bottom.set_xlim(xs[0] - 0.5, xs[-1] + 0.5)
    return fig


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
    with connect(args) as client:
        detail = fetch_session(client, args, include_steps=True)
    s = detail.session
    if not detail.steps:
        print(
            f"regulator plot: job {s.job_id!r} (attempt {s.attempt}) has no steps yet: nothing to plot",
            file=sys.stderr,
        )
        return 1
    fig = draw(detail)
    try:
        fig.savefig(args.output, dpi=args.dpi)
    except (OSError, ValueError) as exc:  # ValueError: an unknown image format
        print(f"regulator plot: {args.output}: {exc}", file=sys.stderr)
        return 2
    print(f"plotted {len(detail.steps)} steps of job {s.job_id!r} (attempt {s.attempt}) to {args.output}", file=sys.stderr)
    return 0
