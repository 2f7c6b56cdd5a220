"""The figure of ``regulator plot``: one job's Fisher traces, windows and coefficients on one
epoch axis.

Three panels share the x-axis, in epochs (integer ticks):

* Fisher trace of every closed epoch, per modality (log scale). Nothing else is drawn in this
  panel but the resume markers, which span the axes' height without touching its limits: its
  y-axis is the data's.
* Window open, per modality: one row each, a filled cell for every epoch its window was open
  (a strip of its own, so that windows never cover the traces and overlapping windows stay
  apart).
* The proximal coefficient of every step: epoch ``e``'s steps spread evenly over
  ``[e - 0.5, e + 0.5)``, so a step sits above the epoch it belongs to.

Where the job resumed from a checkpoint (a later attempt with ``resume_epoch``), a dashed line
at the epoch boundary crosses all three panels, labelled "resumed (attempt N)"; the attempts'
steps are joined on the one axis (``job_history``).

matplotlib is an optional dependency, imported only here; the figure is drawn through
``matplotlib.figure.Figure`` (Agg canvas), so no pyplot state and no display are involved.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

from inforeg.regulator.v1 import regulator_pb2 as pb

from .commands.inspect import fmt_profile
from .job_history import JobHistory

MAX_BOUNDARIES = 200  # more epoch lines than this would grey out the panel
FEW_STEPS = 60  # up to this many steps in a segment, each gets a marker (a lone step is no line)
RESUME_STYLE = {"color": "0.15", "linestyle": "--", "linewidth": 1.0}


def step_positions(steps: Sequence[pb.StepRecord]) -> list[float]:
    """Each step's place on the epoch axis: epoch ``e``'s ``n`` steps at
    ``e - 0.5 + (i + 0.5) / n``, ``i`` its index within the epoch (steps come in step order)."""
    out: list[float] = []
    for epoch, group in itertools.groupby(steps, key=lambda s: s.epoch):
        n = len(list(group))
        out.extend(epoch - 0.5 + (i + 0.5) / n for i in range(n))
    return out


def positive(x: float) -> float:
    """A value a log axis can show (NaN leaves a gap): a zero or undefined trace is not data."""
    return x if x > 0 and math.isfinite(x) else math.nan


def title(h: JobHistory) -> str:
    s = h.session
    if h.resumes:
        at = ", ".join(f"epoch {r.epoch}" for r in h.resumes)
        who = f"attempts {', '.join(map(str, h.attempts))} (resumed at {at})"
    else:
        who = f"attempt {s.attempt}"
    return f"{s.job_id} - {who}\n{fmt_profile(s)}"


def fisher_panel(ax: Any, h: JobHistory, colors: dict[str, str]) -> None:
    """The traces of the closed epochs: the only data of this panel, so its y-limits are theirs."""
    closed = [e for e in h.epochs if e.closed]
    for i, (m, c) in enumerate(colors.items()):
        ax.plot([e.epoch for e in closed], [positive(e.modalities[i].fisher_trace) for e in closed], color=c, marker=".", label=m)
    ax.set_yscale("log")
    ax.set_ylabel("Fisher trace")
    ax.set_title("Fisher trace per closed epoch", fontsize=9)
    if not closed:
        ax.text(0.5, 0.5, "no closed epoch yet", transform=ax.transAxes, ha="center", va="center", color="0.4")


def window_panel(ax: Any, h: JobHistory, colors: dict[str, str]) -> None:
    """One row per modality, a filled cell for every epoch its window was open."""
    for row, (m, c) in enumerate(colors.items()):
        cells = [(e.epoch - 0.5, 1.0) for e in h.epochs if (e.closed or e.steps) and e.modalities[row].window.open]
        if cells:
            ax.broken_barh(cells, (row - 0.35, 0.7), facecolors=c, alpha=0.45, edgecolors="white", linewidth=0.5)
    ax.set_yticks(range(len(colors)), list(colors), fontsize=8)
    ax.set_ylim(len(colors) - 0.5, -0.5)  # the first modality on top
    ax.tick_params(axis="y", length=0)
    ax.set_title("window open (filled)", fontsize=9)


def coefficient_panel(ax: Any, h: JobHistory, colors: dict[str, str], epochs: Sequence[int]) -> None:
    """Every step's proximal coefficient; each attempt's steps are a curve of their own."""
    for n, seg in enumerate(h.segments):
        xs = step_positions(seg.steps)
        for i, (m, c) in enumerate(colors.items()):
            ax.plot(xs, [st.modalities[i].factors.proximal for st in seg.steps], color=c, lw=0.8,
                    marker="." if len(xs) <= FEW_STEPS else None, label=None if n else m,
                    gid=f"proximal/{m}/attempt-{seg.attempt}")  # named in SVG output too
    if len(epochs) <= MAX_BOUNDARIES:
        for e in epochs[1:]:
            ax.axvline(e - 0.5, color="0.88", lw=0.5, zorder=0)
    ax.set_ylabel("proximal coefficient")
    ax.set_title(f"coefficient applied per step ({len(h.steps)} steps; each epoch's steps spread across it)", fontsize=9)
    ax.set_xlabel("epoch")


def draw(h: JobHistory) -> Any:
    """The figure (a ``matplotlib.figure.Figure``) of one job's history."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    colors = {m: f"C{i}" for i, m in enumerate(h.session.modalities)}
    fig = Figure(figsize=(10, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    fisher, windows, coef = fig.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [3.0, 0.35 + 0.25 * len(colors), 3.0]}
    )
    fig.suptitle(title(h), fontsize=10)
    epochs = sorted({e.epoch for e in h.epochs if e.closed or e.steps} | {st.epoch for st in h.steps})
    fisher_panel(fisher, h, colors)
    window_panel(windows, h, colors)
    coefficient_panel(coef, h, colors, epochs)
    for r in h.resumes:  # spans each panel's height in axes units: no panel's y-limits move
        for ax in (fisher, windows, coef):
            ax.axvline(r.epoch - 0.5, gid=f"resumed/attempt-{r.attempt}", **RESUME_STYLE)
        fisher.text(r.epoch - 0.5, 0.97, f" resumed (attempt {r.attempt})", transform=fisher.get_xaxis_transform(),
                    ha="left", va="top", fontsize=8, color=RESUME_STYLE["color"])
    # one shared epoch axis; integer ticks even where it spans one epoch (one integer will do)
    coef.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if epochs:
        coef.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    for ax in (fisher, coef):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig
