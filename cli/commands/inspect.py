"""``regulator sessions | show | export``: read a running regulator's sessions, for people and scripts.

Every command is a few ``ListSessions``/``GetSession`` calls through ``RegulatorClient`` (a long
history comes page by page: ``export`` writes each page as it arrives);
the server's errors (NOT_FOUND, UNAVAILABLE, ...) reach ``regulator``'s ``main`` as
``RegulatorError`` and become ``regulator <cmd>: <CODE>: <message>`` with exit code 1; a
mistake in the connection flags is caught before any call (``connection``), exit code 2.

``export --what steps --format jsonl`` writes the session in the statistics-trace format
(``trace-format.md``: a ``session`` line, ``step`` lines, ``epoch_end`` lines), so the export of
a live job can be replayed under another profile: "what would profile X have done on my run?".
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import functools
import json
import math
import os
import sys
import threading
import time
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Sequence

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_client.profiles import profile_name, profile_params
from regulator_client.cli_args import add_connection_flags

from .. import connection
from ..connection import resolve_target

SLOW_FETCH_S = 1.0  # a fetch slower than this gets progress notes on stderr
# GetSession pages are at most 2 MiB (the server's cap), far below gRPC's 4 MiB default; the
# limit is lifted anyway for servers older than paging, which answered every step at once.
MAX_RECEIVE_BYTES = 1 << 30

# derived from the wire contract, so a new state or fallback mode is never printed as '?'
STATE_NAMES = {
    v.number: v.name.removeprefix("SESSION_STATE_").lower()
    for v in pb.SessionState.DESCRIPTOR.values
    if v.number != pb.SESSION_STATE_UNSPECIFIED
}
FALLBACK_NAMES = {
    v.number: v.name.removeprefix("FALLBACK_").lower()
    for v in pb.Fallback.DESCRIPTOR.values
    if v.number != pb.FALLBACK_UNSPECIFIED
}


# -- connection -------------------------------------------------------------------------------


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[RegulatorClient]:
    """A ``RegulatorClient`` for the flags, its errors said in one line (``connection.connect``)."""
    with connection.connect(args, options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]) as client:
        yield client


class Progress:
    """Notes on stderr while a long history is fetched: one once it takes a while, then at most
    one a second with the steps fetched so far."""

    def __init__(self, args: argparse.Namespace, what: str) -> None:
        self._args, self._what = args, what
        self._t0 = time.monotonic()
        self._last = 0.0
        self._timer = threading.Timer(SLOW_FETCH_S, self._note)
        self._timer.daemon = True

    def _note(self) -> None:
        print(f"regulator: fetching the {self._what} of job {self._args.job!r} from {resolve_target(self._args)} ...",
              file=sys.stderr, flush=True)
        self._last = time.monotonic()

    def page(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._t0 > SLOW_FETCH_S and now - self._last >= 1.0 and done < total:
            print(f"regulator: {done:,} of {total:,} steps fetched ...", file=sys.stderr, flush=True)
            self._last = now

    def __enter__(self) -> "Progress":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def fetch_session(client: RegulatorClient, args: argparse.Namespace, include_steps: bool) -> pb.GetSessionResponse:
    """``GetSession``, every page of it with ``include_steps``, with progress notes on stderr."""
    with Progress(args, "full history" if include_steps else "history") as progress:
        return client.get_session(args.job, args.attempt, include_steps=include_steps, on_page=progress.page)


@dataclasses.dataclass
class History:
    """A session's header and epochs, and its steps as they arrive page by page."""

    session: pb.SessionInfo
    epochs: Sequence[pb.EpochRecord]
    steps: Iterable[pb.StepRecord]
    steps_pruned_unix_ms: int = 0


@contextlib.contextmanager
def stream_history(client: RegulatorClient, args: argparse.Namespace, include_steps: bool) -> Iterator[History]:
    """The session's pages fetched while they are consumed (``export`` writes each page as it
    comes: memory holds one page, whatever the history's length)."""
    with Progress(args, "full history" if include_steps else "history") as progress:
        pages = client.session_pages(args.job, args.attempt, include_steps=include_steps)
        first = next(pages)

        def steps() -> Iterator[pb.StepRecord]:
            done = len(first.steps)
            yield from first.steps
            for page in pages:
                done += len(page.steps)
                progress.page(done, first.session.steps)
                yield from page.steps

        yield History(first.session, first.epochs, steps(), first.steps_pruned_unix_ms)


def pruned_note(s: pb.SessionInfo, pruned_ms: int) -> str:
    return (
        f"the step records of job {s.job_id!r} (attempt {s.attempt}) were pruned on {fmt_time(pruned_ms)} "
        "(the server's --step-retention); its epochs are kept"
    )


def pipe_safe(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``regulator show JOB | head`` ends quietly when the reader goes away, not with a traceback."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush too
            return 0

    return wrapper


# -- plain data (the --json and export shapes) --------------------------------------------------


def finite(x: float) -> Optional[float]:
    """NaN (an undefined window growth) becomes null: JSON has no NaN."""
    return x if math.isfinite(x) else None


def session_dict(s: pb.SessionInfo) -> dict[str, Any]:
    if s.state == pb.SESSION_STATE_CORRUPT:  # quarantined: only its key and why are known
        return {"job_id": s.job_id, "attempt": s.attempt, "state": STATE_NAMES[s.state], "state_reason": s.state_reason}
    return {
        "job_id": s.job_id,
        "attempt": s.attempt,
        "state": STATE_NAMES.get(s.state, "unspecified"),
        "profile": profile_name(s.profile),
        "profile_params": profile_params(s.profile),
        "modalities": list(s.modalities),
        "world_size": s.world_size,
        "epoch": s.epoch,
        "steps": s.steps,
        "last_step": s.last_step,
        "window": {w.modality: {"open": w.open, "growth": finite(w.growth)} for w in s.window},
        "created_unix_ms": s.created_unix_ms,
        **({"state_reason": s.state_reason} if s.state_reason else {}),
    }


def epoch_dict(e: pb.EpochRecord) -> dict[str, Any]:
    return {
        "epoch": e.epoch,
        "closed": e.closed,
        "steps": e.steps,
        "fallback_steps": e.fallback_steps,
        **({"restored": True} if e.restored else {}),
        "modalities": {
            m.modality: {
                "fisher_trace": m.fisher_trace,
                "window_open": m.window.open,
                "growth": finite(m.window.growth),
                "regulated_steps": m.regulated_steps,
                "mean_proximal": m.mean_proximal,
                "max_proximal": m.max_proximal,
                "mean_score": m.mean_score,
            }
            for m in e.modalities
        },
    }


def step_dict(s: pb.StepRecord) -> dict[str, Any]:
    """A trace-format ``step`` line plus what the regulator answered (``fallback``, ``proximal``)."""
    return {
        "type": "step",
        "epoch": s.epoch,
        "step": s.step,
        "count": s.count,
        "fallback": FALLBACK_NAMES.get(s.fallback),
        "score_sum": {m.modality: m.score_sum for m in s.modalities},
        "fisher": {m.modality: m.fisher for m in s.modalities},
        "proximal": {m.modality: m.factors.proximal for m in s.modalities},
    }


def trace_header(s: pb.SessionInfo) -> dict[str, Any]:
    """The trace's ``session`` line; the extra keys are ignored by ``read_trace``."""
    head: dict[str, Any] = {"type": "session", "modalities": list(s.modalities)}
    params = profile_params(s.profile)
    if params.get("reference_modality"):  # a trace's own key, for any profile that has one
        head["reference_modality"] = params["reference_modality"]
    head.update(job_id=s.job_id, attempt=s.attempt, profile=profile_name(s.profile), profile_params=params)
    return head


def trace_lines(session: pb.SessionInfo, epochs: Sequence[pb.EpochRecord], steps: Iterable[pb.StepRecord]) -> Iterator[dict[str, Any]]:
    """``session``, then each epoch's steps followed by its ``epoch_end`` once closed (steps
    arrive in step order, so epochs in order too: the lines stream as the pages come)."""
    yield trace_header(session)
    closed = [e.epoch for e in epochs if e.closed]
    i = 0
    for s in steps:
        while i < len(closed) and closed[i] < s.epoch:
            yield {"type": "epoch_end", "epoch": closed[i]}
            i += 1
        yield step_dict(s)
    for epoch in closed[i:]:
        yield {"type": "epoch_end", "epoch": epoch}


def latest_coefficients(detail: pb.GetSessionResponse) -> tuple[Optional[int], dict[str, float]]:
    """The mean coefficient per modality of the latest epoch that has steps.

    The exact last step's coefficients would need every step of the session (``include_steps``);
    the epoch mean is in the light ``GetSession`` answer and is what a person wants to see.
    """
    for e in reversed(detail.epochs):
        if e.steps:
            return e.epoch, {m.modality: m.mean_proximal for m in e.modalities}
    return None, {}


# -- formatting -------------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """Columns padded to their widest cell; ``align`` has one ``l`` or ``r`` per column."""
    assert len(align) == len(header), (align, header)
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def fmt_num(x: float, spec: str) -> str:
    return "-" if not math.isfinite(x) else format(x, spec)


def fmt_coef(x: float) -> str:
    return "0" if x == 0.0 else format(x, ".4f")


def fmt_window(open_: bool, growth: float) -> str:
    state = "open" if open_ else "closed"
    return state if not math.isfinite(growth) else f"{state} ({growth:+.3g})"


def fmt_time(unix_ms: int) -> str:
    if not unix_ms:
        return "-"
    return dt.datetime.fromtimestamp(unix_ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_profile(s: pb.SessionInfo) -> str:
    params = ", ".join(f"{k}={v}" for k, v in profile_params(s.profile).items())
    return f"{profile_name(s.profile)} ({params})" if params else profile_name(s.profile)


def print_json(obj: Any, out: IO[str]) -> None:
    json.dump(obj, out, indent=2, allow_nan=False)
    out.write("\n")


# -- sessions -----------------------------------------------------------------------------------


@pipe_safe
def run_sessions(args: argparse.Namespace) -> int:
    with connect(args) as client:
        infos = client.list_sessions(include_inactive=args.all)
        rows = []
        for s in infos:
            if s.state == pb.SESSION_STATE_CORRUPT:  # quarantined: its history does not decode
                rows.append((s, None, {}))
                continue
            detail = client.get_session(s.job_id, s.attempt)
            coef_epoch, coefs = latest_coefficients(detail)
            rows.append((s, coef_epoch, coefs))
    if args.json:
        print_json(
            [{**session_dict(s), "coefficient_epoch": ce, "mean_proximal": c} for s, ce, c in rows],
            sys.stdout,
        )
        return 0
    if not rows:
        scope = "sessions" if args.all else "open sessions (--all lists closed and superseded ones too)"
        print(f"no {scope} at {resolve_target(args)}")
        return 0
    body = [
        (
            s.job_id,
            str(s.attempt),
            STATE_NAMES.get(s.state, "?"),
            *(
                ("-", "-", "-", "-")  # quarantined: nothing of it decodes (the reason follows the table)
                if s.state == pb.SESSION_STATE_CORRUPT
                else (profile_name(s.profile), str(s.epoch), str(s.steps),
                      " ".join(f"{w.modality}:{'open' if w.open else 'closed'}" for w in s.window))
            ),
            " ".join(f"{m}:{fmt_coef(v)}" for m, v in c.items()) + (f" (ep {ce})" if ce is not None else "-"),
        )
        for s, ce, c in rows
    ]
    print(table(("JOB", "ATTEMPT", "STATE", "PROFILE", "EPOCH", "STEPS", "WINDOW", "MEAN BETA (LATEST EPOCH)"), body, "lrllrrll"))
    for s, _, _ in rows:
        if s.state_reason:
            print(f"{s.job_id} attempt {s.attempt} is {STATE_NAMES.get(s.state, '?')}: {s.state_reason}")
    return 0


# -- show ----------------------------------------------------------------------------------------


def session_header(s: pb.SessionInfo) -> str:
    window = " ".join(f"{w.modality}:{fmt_window(w.open, w.growth)}" for w in s.window)
    return "\n".join(
        [
            f"job         {s.job_id}   attempt {s.attempt}   state {STATE_NAMES.get(s.state, '?')}   world size {s.world_size}",
            f"profile     {fmt_profile(s)}",
            f"modalities  {', '.join(s.modalities)}",
            f"created     {fmt_time(s.created_unix_ms)}",
            f"progress    epoch {s.epoch}, {s.steps} steps recorded (last step {s.last_step})",
            f"window      {window}   (the current epoch's)",
        ]
    )


def epochs_table(epochs: Sequence[pb.EpochRecord]) -> str:
    """One row per epoch and modality, so that any number of modalities stays readable."""
    rows = []
    for e in epochs:
        for i, m in enumerate(e.modalities):
            mark = "r" if e.restored else "" if e.closed else "*"
            head = (f"{e.epoch}{mark}", str(e.steps), str(e.fallback_steps)) if i == 0 else ("", "", "")
            rows.append(
                (
                    *head,
                    m.modality,
                    fmt_num(m.fisher_trace, ".4e"),
                    fmt_window(m.window.open, m.window.growth),
                    str(m.regulated_steps),
                    fmt_coef(m.mean_proximal),
                    fmt_coef(m.max_proximal),
                    fmt_num(m.mean_score, ".4f"),
                )
            )
    header = ("EPOCH", "STEPS", "FALLBACK", "MODALITY", "FISHER TRACE", "WINDOW (GROWTH)", "REGULATED", "MEAN BETA", "MAX BETA", "MEAN SCORE")
    out = table(header, rows, "rrrlrlrrrr")
    if any(not e.closed for e in epochs):
        out += "\n* still open: trace and summaries so far"
    if any(e.restored for e in epochs):
        out += "\nr restored from the job's checkpoint by a regulator that did not hold the job (not observed here)"
    return out


def steps_table(steps: Sequence[pb.StepRecord], modalities: Sequence[str]) -> str:
    header = ["STEP", "EPOCH", "COUNT", "FALLBACK"]
    for m in modalities:
        header += [f"{m}:SCORE", f"{m}:FISHER", f"{m}:BETA"]
    rows = []
    for s in steps:
        row = [str(s.step), str(s.epoch), str(s.count), FALLBACK_NAMES.get(s.fallback, "")]
        for m in s.modalities:
            row += [fmt_num(m.score_sum / s.count, ".4f"), fmt_num(m.fisher, ".4e"), fmt_coef(m.factors.proximal)]
        rows.append(row)
    return table(header, rows, "rrrl" + "rrr" * len(modalities)) + "\n(SCORE: mean true-class probability, score_sum / count)"


@pipe_safe
def run_show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        detail = fetch_session(client, args, include_steps=args.steps)
    pruned = detail.steps_pruned_unix_ms
    if args.json:
        obj: dict[str, Any] = {"session": session_dict(detail.session), "epochs": [epoch_dict(e) for e in detail.epochs]}
        if args.steps:
            obj["steps"] = [step_dict(s) for s in detail.steps]
        if pruned:
            obj["steps_pruned_unix_ms"] = pruned
        print_json(obj, sys.stdout)
        return 0
    print(session_header(detail.session))
    print()
    print(epochs_table(detail.epochs) if detail.epochs else "no epochs yet")
    if args.steps:
        print()
        if pruned:
            print(pruned_note(detail.session, pruned))
        else:
            print(steps_table(detail.steps, detail.session.modalities) if detail.steps else "no steps yet")
    return 0


# -- export --------------------------------------------------------------------------------------


STEP_FIELDS = ("score_sum", "fisher", "proximal")
EPOCH_FIELDS = ("fisher_trace", "window_open", "growth", "regulated_steps", "mean_proximal", "max_proximal", "mean_score")


def cell(v: Any) -> Any:
    """CSV spelling: booleans as 0/1, null (an undefined growth) as an empty cell."""
    return "" if v is None else int(v) if isinstance(v, bool) else v


def write_csv(h: History, what: str, out: IO[str]) -> int:
    """The rows of the JSON shapes, one column per modality and field (``fac_fisher``, ...)."""
    mods = list(h.session.modalities)
    w = csv.writer(out, lineterminator="\n")  # floats print as repr: full float64 precision
    if what == "steps":
        w.writerow(["epoch", "step", "count", "fallback", *[f"{m}_{f}" for m in mods for f in STEP_FIELDS]])
        n = 0
        for d in map(step_dict, h.steps):
            w.writerow([d["epoch"], d["step"], d["count"], cell(d["fallback"]), *[d[f][m] for m in mods for f in STEP_FIELDS]])
            n += 1
        return n
    w.writerow(["epoch", "closed", "steps", "fallback_steps", *[f"{m}_{f}" for m in mods for f in EPOCH_FIELDS]])
    for d in map(epoch_dict, h.epochs):
        per = d["modalities"]
        w.writerow([d["epoch"], cell(d["closed"]), d["steps"], d["fallback_steps"], *[cell(per[m][f]) for m in mods for f in EPOCH_FIELDS]])
    return len(h.epochs)


def write_jsonl(h: History, what: str, out: IO[str]) -> int:
    if what == "steps":
        lines: Iterator[dict[str, Any]] = trace_lines(h.session, h.epochs, h.steps)
    else:
        lines = ({"type": "epoch", **epoch_dict(e)} for e in h.epochs)
    n = 0
    for obj in lines:
        out.write(json.dumps(obj, allow_nan=False) + "\n")
        n += obj["type"] in ("step", "epoch")
    return n


@pipe_safe
def run_export(args: argparse.Namespace) -> int:
    write = write_csv if args.format == "csv" else write_jsonl
    steps = args.what == "steps"
    with connect(args) as client, stream_history(client, args, include_steps=steps) as h:
        if steps and h.steps_pruned_unix_ms:
            print(f"regulator export: {pruned_note(h.session, h.steps_pruned_unix_ms)}: "
                  "only `--what epochs` can be exported", file=sys.stderr)
            return 1
        if args.output == "-":
            write(h, args.what, sys.stdout)
            return 0
        tmp = f"{args.output}.partial"  # the file appears only once every page is written
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as out:
                n = write(h, args.what, out)
            os.replace(tmp, args.output)
        except OSError as exc:
            print(f"regulator export: {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    s = h.session
    print(f"exported {n} {args.what} of job {s.job_id!r} (attempt {s.attempt}) to {args.output}", file=sys.stderr)
    return 0


# -- parsers -------------------------------------------------------------------------------------


def add_job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job id")
    p.add_argument("--attempt", type=int, default=None, help="attempt (default: the latest)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sessions", help="list the regulator's sessions")
    s.add_argument("--all", action="store_true", help="closed and superseded sessions too")
    s.add_argument("--json", action="store_true", help="JSON instead of a table")
    add_connection_flags(s)
    s.set_defaults(func=run_sessions)

    sh = sub.add_parser("show", help="one session: header and per-epoch history (and every step)")
    add_job_flags(sh)
    sh.add_argument("--steps", action="store_true", help="every step too (fetches the whole history)")
    sh.add_argument("--json", action="store_true", help="JSON instead of tables")
    add_connection_flags(sh)
    sh.set_defaults(func=run_show)

    ex = sub.add_parser(
        "export",
        help="a session's steps or epochs as CSV or JSON lines",
        description="With --what steps --format jsonl (the default) the file is a statistics trace "
        "that `regulator replay` accepts: what would another profile have done on this run?",
    )
    add_job_flags(ex)
    ex.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="output format (default jsonl)")
    ex.add_argument("--what", choices=("steps", "epochs"), default="steps", help="rows: one per step (default) or per epoch")
    ex.add_argument("-o", "--output", default="-", help="output file (default stdout)")
    add_connection_flags(ex)
    ex.set_defaults(func=run_export)
