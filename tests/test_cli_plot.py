"""`regulator plot`: the figure's axes as a reader sees them (issue 17 item 7). The Fisher panel's
y-axis is its data's (windows are drawn in a strip of their own), epoch ticks are integers, and
the attempts of a resumed job are joined on one epoch axis with a marker where it resumed.

Real sessions on a real in-thread server: replayed traces, and a real digits training run
killed after 2 epochs and resumed from its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from regulator_client import RegulatorClient
from regulator_client.trace import TraceStep, read_trace, replay_events
from regulator_cli import main as cli
from regulator_cli.job_history import JobHistory, job_history
from regulator_service.edge.server import RegulatorServer, ServerConfig

from .conftest import data_file, roomy_limits

pytest.importorskip("matplotlib", reason="regulator plot needs matplotlib (extra `plot`)")

from regulator_cli.plot_figure import draw, step_positions  # noqa: E402  (needs matplotlib)

PIXMOR = "trace_pix+mor_seed0.jsonl"
RESUMES = ((1, 6), (2, 12))  # (attempt, resume_epoch) of the job "resumed"


def events_between(events: list, first: int, end: int, extra_steps: int = 0) -> list:
    """The trace's events of epochs [first, end), then ``extra_steps`` steps of epoch ``end``
    (a process killed in the middle of that epoch)."""
    out = [e for e in events if first <= e.epoch < end]
    return out + [e for e in events if isinstance(e, TraceStep) and e.epoch == end][:extra_steps]


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    """Sessions: ``resumed`` (attempt 0 killed in epoch 7, attempt 1 resumed at 6 and killed in
    epoch 14, attempt 2 resumed at 12 and ran to epoch 20; history=2, so windows close early),
    ``short`` (2 epochs) and ``one`` (a single step)."""
    srv = RegulatorServer(ServerConfig(port=0, metrics_port=None, limits=roomy_limits())).start()
    header, events = read_trace(data_file(PIXMOR))
    profile = {"reference_modality": "pix", "history": 2}
    with RegulatorClient.connect(srv.target, timeout=30.0) as client:
        client.open_session("resumed", header.modalities, "official", **profile)
        list(replay_events(client, "resumed", header, events_between(events, 0, 7, extra_steps=10)))
        client.open_session("resumed", header.modalities, "official", attempt=1, resume_epoch=6, **profile)
        list(replay_events(client, "resumed", header, events_between(events, 6, 14, extra_steps=5), attempt=1))
        client.open_session("resumed", header.modalities, "official", attempt=2, resume_epoch=12, **profile)
        list(replay_events(client, "resumed", header, events_between(events, 12, 20), attempt=2))
        client.open_session("short", header.modalities, "official", reference_modality="pix")
        list(replay_events(client, "short", header, events_between(events, 0, 2)))
        client.open_session("one", ["a", "b"], "paper")
        client.report("one", attempt=0, epoch=0, step=0, count=2, score_sums={"a": 1.0, "b": 1.0}, fisher={"a": 0.5, "b": 0.5})
    yield srv.target
    srv.stop(grace=0)


def history_of(target: str, job: str, attempt: Any = None) -> JobHistory:
    with RegulatorClient.connect(target, timeout=30.0) as client:
        return job_history(client, job, attempt, lambda a: client.get_session(job, a, include_steps=True))


def panels(fig: Any) -> tuple[Any, Any, Any]:
    fisher, windows, coef = fig.axes
    return fisher, windows, coef


# -- joining attempts ---------------------------------------------------------------------------


def test_attempts_of_a_resumed_job_are_joined_without_the_rolled_back_steps(target: str) -> None:
    h = history_of(target, "resumed")
    assert h.session.attempt == 2 and h.attempts == [0, 1, 2]
    assert [(r.attempt, r.epoch) for r in h.resumes] == list(RESUMES)
    # attempt 0 ran 10 steps into epoch 7 and attempt 1 5 into epoch 14: rolled back, not shown
    assert [sorted({s.epoch for s in seg.steps}) for seg in h.segments] == [list(range(0, 6)), list(range(6, 12)), list(range(12, 20))]
    assert [s.step for s in h.steps] == list(range(20 * 25))  # one history, in step order, no gap
    assert [e.epoch for e in h.epochs if e.closed] == list(range(20))  # inherited epochs first
    # an earlier attempt asked for: joined with its own past only
    h1 = history_of(target, "resumed", 1)
    assert h1.attempts == [0, 1] and [(r.attempt, r.epoch) for r in h1.resumes] == [(1, 6)]
    assert h1.steps[-1].epoch == 14 and not h1.notes


# -- the figure ---------------------------------------------------------------------------------


def integer_ticks(ax: Any) -> list[float]:
    ticks = [float(t) for t in ax.get_xticks()]
    assert ticks and all(t.is_integer() for t in ticks), ticks
    return ticks


@pytest.mark.parametrize("job", ["one", "short", "resumed"])
def test_epoch_ticks_are_integers_on_short_and_long_runs(target: str, job: str) -> None:
    fig = draw(history_of(target, job))
    fig.canvas.draw()  # the ticks of the laid-out figure
    for ax in panels(fig):  # one shared x-axis
        ticks = integer_ticks(ax)
        lo, hi = ax.get_xlim()
        assert any(lo <= t <= hi for t in ticks)
    assert panels(fig)[2].get_xlabel() == "epoch"


def test_the_fisher_panel_y_axis_is_its_data_and_windows_have_their_own_strip(target: str) -> None:
    from matplotlib.figure import Figure

    h = history_of(target, "resumed")
    fisher, windows, _ = panels(draw(h))
    closed = [e for e in h.epochs if e.closed]
    # the same traces alone on a fresh log axis give the same y-limits: nothing else moved them
    ref = Figure().subplots()
    for i in range(2):
        ref.plot([e.epoch for e in closed], [e.modalities[i].fisher_trace for e in closed])
    ref.set_yscale("log")
    assert fisher.get_ylim() == pytest.approx(ref.get_ylim(), rel=1e-12)
    assert not fisher.patches and not fisher.collections  # no shading over the traces
    # one row per modality in the strip, a cell at every epoch whose window was open
    assert [t.get_text() for t in windows.get_yticklabels()] == ["pix", "mor"]
    for row, collection in enumerate(windows.collections):
        starts = sorted(round(float(p.vertices[:, 0].min()), 6) for p in collection.get_paths())
        opened = [e.epoch - 0.5 for e in h.epochs if (e.closed or e.steps) and e.modalities[row].window.open]
        assert starts == opened and opened  # history=2: open for the first epochs only
        assert max(opened) < 6


def test_a_resume_is_marked_in_every_panel(target: str) -> None:
    h = history_of(target, "resumed")
    fisher, windows, coef = panels(draw(h))
    for attempt, epoch in RESUMES:
        for ax in (fisher, windows, coef):
            marks = [ln for ln in ax.lines if ln.get_gid() == f"resumed/attempt-{attempt}"]
            assert len(marks) == 1 and list(marks[0].get_xdata()) == [epoch - 0.5] * 2, (ax.get_title(), epoch)
            assert marks[0].get_linestyle() == "--"
        labels = [t for t in fisher.texts if t.get_text().strip() == f"resumed (attempt {attempt})"]
        assert len(labels) == 1 and labels[0].get_position()[0] == epoch - 0.5
    assert "attempts 0, 1, 2 (resumed at epoch 6, epoch 12)" in fig_title(fisher)
    # each attempt's steps on the one axis, every step above its own epoch
    curves = [ln for ln in coef.lines if str(ln.get_gid()).startswith("proximal/pix/")]
    assert [ln.get_gid() for ln in curves] == [f"proximal/pix/attempt-{a}" for a in (0, 1, 2)]
    xs = [x for ln in curves for x in ln.get_xdata()]
    assert len(xs) == 500
    assert xs == sorted(xs) and all(s.epoch - 0.5 <= x < s.epoch + 0.5 for s, x in zip(h.steps, xs))


def test_an_unresumed_job_has_no_marker(target: str) -> None:
    fisher, _, coef = panels(draw(history_of(target, "short")))
    assert not fisher.texts and not any(str(ln.get_gid()).startswith("resumed") for ln in coef.lines)
    assert "short - attempt 0" in fig_title(fisher)


def fig_title(ax: Any) -> str:
    return ax.figure.get_suptitle()


def test_step_positions_spread_each_epoch() -> None:
    from inforeg.regulator.v1 import regulator_pb2 as pb

    steps = [pb.StepRecord(epoch=e, step=i) for i, e in enumerate([0, 0, 0, 0, 3, 3])]
    assert step_positions(steps) == [-0.375, -0.125, 0.125, 0.375, 2.75, 3.25]


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_real_resumed_training_job_plots_as_one_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """trainers.digits with --checkpoint for 2 epochs, then the same command for 4: the
    regulator's attempt 1 resumes at epoch 2, and the plot joins both attempts."""
    from trainers import digits

    ckpt = tmp_path / "job.pt"
    with RegulatorServer(ServerConfig(port=0, metrics_port=None, limits=roomy_limits())) as srv:
        base = ["--target", srv.target, "--profile", "official", "--job-id", "digits-resumed", "--checkpoint", str(ckpt)]
        assert digits.main([*base, "--epochs", "2"]) == 0
        assert digits.main([*base, "--epochs", "4"]) == 0
        h = history_of(srv.target, "digits-resumed")
        assert h.attempts == [0, 1] and [(r.attempt, r.epoch) for r in h.resumes] == [(1, 2)]
        assert sorted({s.epoch for s in h.steps}) == [0, 1, 2, 3]
        assert [s.step for s in h.steps] == list(range(len(h.steps)))
        png = tmp_path / "resumed.png"
        capsys.readouterr()
        assert cli.main(["plot", "digits-resumed", "-o", str(png), "--dpi", "40", "--target", srv.target]) == 0
    err = capsys.readouterr().err
    assert f"plotted {len(h.steps)} steps of job 'digits-resumed' (attempts 0, 1) to {png}" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
