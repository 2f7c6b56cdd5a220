"""`regulator sessions | show | export | plot` against a real in-thread server fed by replayed traces."""

from __future__ import annotations

import csv
import io
import json
import socket
from pathlib import Path
from typing import Iterator

import pytest

from regulator_client import RegulatorClient
from regulator_client.trace import TraceEpochEnd, TraceStep, read_trace, replay_events
from regulator_cli import main as cli
from regulator_cli.commands import inspect
from regulator_service.edge.server import RegulatorServer, ServerConfig

from .conftest import data_file, read_jsonl, roomy_limits

PIXMOR = "trace_pix+mor_seed0.jsonl"
SYN3 = "synthetic_3mod_seed11.jsonl"


def regulator(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``regulator ARGV`` through cli.main, in this process."""
    capsys.readouterr()
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module (replaying costs a second or two), with three sessions:
    ``pixmor`` (official, 50 epochs, closed), ``syn3`` (paper, 3 modalities, left open after
    its last epoch_end) and ``partial`` (official, stopped in the middle of epoch 2)."""
    state = tmp_path_factory.mktemp("state")
    srv = RegulatorServer(ServerConfig(port=0, metrics_port=None, state_dir=state, grace_seconds=1.0, limits=roomy_limits())).start()
    with RegulatorClient.connect(srv.target, timeout=10.0) as client:
        header, events = read_trace(data_file(PIXMOR))
        client.open_session("pixmor", header.modalities, "official", reference_modality="pix")
        list(replay_events(client, "pixmor", header, events))
        client.close_session("pixmor", attempt=0)
        client.open_session("partial", header.modalities, "official", reference_modality="pix")
        cut = next(i for i, ev in enumerate(events) if isinstance(ev, TraceStep) and ev.epoch == 2 and ev.step == 60)
        list(replay_events(client, "partial", header, events[:cut]))
        header3, events3 = read_trace(data_file(SYN3))
        client.open_session("syn3", header3.modalities, "paper")
        list(replay_events(client, "syn3", header3, events3))
    yield srv.target
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def pixmor_steps(target: str) -> list:
    with RegulatorClient.connect(target) as client:
        return list(client.get_session("pixmor", include_steps=True).steps)


# -- sessions ------------------------------------------------------------------------------------


def test_sessions_table_lists_open_sessions_and_latest_coefficients(capsys, target: str) -> None:
    rc, out, _ = regulator(capsys, "sessions", "--target", target)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["JOB", "ATTEMPT", "STATE", "PROFILE", "EPOCH", "STEPS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"partial", "syn3"}  # pixmor is closed
    assert rows["syn3"].split()[1:6] == ["0", "open", "paper", "21", "252"]
    assert "audio:closed visual:open text:closed" in rows["syn3"]
    with RegulatorClient.connect(target) as client:
        current = client.get_session("partial").epochs[-1]  # the open epoch 2, with steps
    assert current.epoch == 2 and not current.closed and current.steps > 0
    beta = {m.modality: m.mean_proximal for m in current.modalities}
    assert beta["pix"] > 0
    assert f"pix:{beta['pix']:.4f} mor:{inspect.fmt_coef(beta['mor'])} (ep 2)" in rows["partial"]
    assert "pix:open mor:open" in rows["partial"]


def test_sessions_all_and_json(capsys, target: str) -> None:
    rc, out, _ = regulator(capsys, "sessions", "--all", "--json", "--target", target)
    assert rc == 0
    by_job = {s["job_id"]: s for s in json.loads(out)}
    assert set(by_job) == {"pixmor", "partial", "syn3"}
    p = by_job["pixmor"]
    assert (p["state"], p["profile"], p["epoch"], p["steps"], p["last_step"]) == ("closed", "official", 50, 1250, 1249)
    assert p["profile_params"]["reference_modality"] == "pix"
    assert p["modalities"] == ["pix", "mor"]
    assert p["coefficient_epoch"] == 49 and set(p["mean_proximal"]) == {"pix", "mor"}
    assert by_job["syn3"]["coefficient_epoch"] == 20  # epoch 21 is open but has no steps yet


def test_target_from_environment(capsys, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGULATOR_TARGET", target)
    rc, out, _ = regulator(capsys, "sessions", "--all")
    assert rc == 0 and "pixmor" in out


# -- show ----------------------------------------------------------------------------------------


def test_show_header_and_epoch_history(capsys, target: str) -> None:
    rc, out, _ = regulator(capsys, "show", "partial", "--target", target)
    assert rc == 0
    assert "job         partial   attempt 0   state open" in out
    assert "official (reference_modality=pix, threshold=0.05, history=10" in out
    assert "modalities  pix, mor" in out
    rows = [line.split() for line in out.splitlines()]
    epoch_rows = [r for r in rows if r and r[0] in ("0", "1", "2*")]
    assert [r[0] for r in epoch_rows] == ["0", "1", "2*"]  # one row per epoch, then the other modality
    assert epoch_rows[0][:4] == ["0", "25", "0", "pix"]
    assert epoch_rows[0][5:7] == ["open", "(+1)"]
    assert "* still open" in out


def test_show_json_with_steps(capsys, target: str, pixmor_steps: list) -> None:
    rc, out, _ = regulator(capsys, "show", "pixmor", "--steps", "--json", "--target", target)
    assert rc == 0
    obj = json.loads(out)
    assert obj["session"]["job_id"] == "pixmor"
    assert len(obj["epochs"]) == 51 and all(e["closed"] for e in obj["epochs"][:50])  # + the open epoch 50
    assert sum(e["steps"] for e in obj["epochs"]) == 1250
    assert obj["epochs"][0]["modalities"]["pix"]["window_open"] is True
    assert len(obj["steps"]) == 1250
    assert obj["steps"][100]["proximal"] == {m.modality: m.factors.proximal for m in pixmor_steps[100].modalities}


def test_show_steps_table(capsys, target: str) -> None:
    rc, out, _ = regulator(capsys, "show", "syn3", "--steps", "--target", target)
    assert rc == 0
    header = next(line for line in out.splitlines() if line.lstrip().startswith("STEP"))
    assert header.split() == ["STEP", "EPOCH", "COUNT", "FALLBACK"] + [
        f"{m}:{f}" for m in ("audio", "visual", "text") for f in ("SCORE", "FISHER", "BETA")
    ]


def test_not_found_is_a_clear_error(capsys, target: str) -> None:
    for argv in (["show", "no-such-job"], ["export", "no-such-job"], ["show", "pixmor", "--attempt", "3"]):
        rc, out, err = regulator(capsys, *argv, "--target", target)
        assert rc == 1 and out == ""
        assert err.startswith(f"regulator {argv[0]}: NOT_FOUND: "), err


def test_unavailable_names_the_target(capsys) -> None:
    with socket.socket() as s:  # bound, never listening: refuses connections, and no one else can take the port
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
        rc, _, err = regulator(capsys, "sessions", "--target", dead, "--timeout", "30")  # retries end long before
    assert rc == 1
    assert err.startswith("regulator sessions: UNAVAILABLE: ") and f"is a regulator serving at {dead}?" in err


def test_a_target_port_out_of_range_is_refused_not_wrapped(capsys, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC takes a port above 65535 modulo 65536: without the check, PORT + 65536 (a typo of
    another port) would silently reach this regulator."""
    host, port = target.rsplit(":", 1)
    wrapped = f"{host}:{int(port) + 65536}"
    rc, out, err = regulator(capsys, "sessions", "--all", "--target", wrapped)
    assert (rc, out) == (1, "")
    assert err.strip() == f"regulator sessions: INVALID_ARGUMENT: target '{wrapped}': {int(port) + 65536} is not a port (0 to 65535)"
    monkeypatch.setenv("REGULATOR_TARGET", wrapped)
    assert regulator(capsys, "sessions", "--all")[0] == 1


def test_token_and_tls(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags reach the transport; the token defaults to $REGULATOR_TOKEN as for every client."""
    from regulator_service.edge.security import TlsFiles, TokenSource

    from .pki import make_pki

    token = "inspect-token-0123456789"
    pki = make_pki(tmp_path)
    config = ServerConfig(port=0, metrics_port=None, token=TokenSource(token=token), tls=TlsFiles(pki.server_cert, pki.server_key))
    with RegulatorServer(config) as srv:
        argv = ["sessions", "--all", "--target", f"localhost:{srv.port}", "--tls-ca", str(pki.ca)]
        monkeypatch.delenv("REGULATOR_TOKEN", raising=False)
        monkeypatch.delenv("REGULATOR_TOKEN_FILE", raising=False)
        rc, _, err = regulator(capsys, *argv)
        assert rc == 1 and err.startswith("regulator sessions: UNAUTHENTICATED: ")
        assert regulator(capsys, *argv, "--token", token)[0] == 0
        monkeypatch.setenv("REGULATOR_TOKEN", token)
        rc, out, _ = regulator(capsys, *argv)
        assert rc == 0 and out.startswith("no sessions at localhost:")


# -- export ------------------------------------------------------------------------------------


def test_export_jsonl_is_a_trace_that_replays_to_the_sessions_coefficients(
    capsys, target: str, tmp_path: Path, pixmor_steps: list
) -> None:
    exported = tmp_path / "pixmor.jsonl"
    rc, out, err = regulator(capsys, "export", "pixmor", "-o", str(exported), "--target", target)
    assert rc == 0 and out == "" and "exported 1250 steps" in err
    header, events = read_trace(exported)
    assert header.modalities == ("pix", "mor") and header.reference_modality == "pix"
    # the same events as the trace the session was fed, bit for bit
    assert (header, events) == read_trace(data_file(PIXMOR))
    lines = read_jsonl(exported)
    assert lines[0]["profile"] == "official" and lines[0]["job_id"] == "pixmor"
    assert sum(line["type"] == "epoch_end" for line in lines) == 50

    replayed = tmp_path / "official.jsonl"
    assert regulator(capsys, "replay", str(exported), "--profile", "official", "-o", str(replayed))[0] == 0
    got = read_jsonl(replayed)
    assert [g["factors"] for g in got] == [{m.modality: m.factors.proximal for m in s.modalities} for s in pixmor_steps]
    # "what would the paper profile have done on this run?"
    whatif = tmp_path / "paper.jsonl"
    assert regulator(capsys, "replay", str(exported), "--profile", "paper", "-o", str(whatif))[0] == 0
    assert read_jsonl(whatif) == read_jsonl(data_file("trace_pix+mor_seed0_expected_paper.jsonl"))


def test_export_of_an_open_session_replays(capsys, target: str, tmp_path: Path) -> None:
    """Epoch 2 is still open: its steps are there, its epoch_end is not."""
    rc, out, _ = regulator(capsys, "export", "partial", "--target", target)
    assert rc == 0
    path = tmp_path / "partial.jsonl"
    path.write_text(out)
    _, events = read_trace(path)
    assert [e.epoch for e in events if isinstance(e, TraceEpochEnd)] == [0, 1]
    assert isinstance(events[-1], TraceStep) and events[-1].step == 59
    assert regulator(capsys, "replay", str(path), "--profile", "official", "-o", str(tmp_path / "r.jsonl"))[0] == 0


def test_export_csv_steps(capsys, target: str, pixmor_steps: list) -> None:
    rc, out, _ = regulator(capsys, "export", "pixmor", "--format", "csv", "--target", target)
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == [
        "epoch", "step", "count", "fallback",
        "pix_score_sum", "pix_fisher", "pix_proximal", "mor_score_sum", "mor_fisher", "mor_proximal",
    ]
    assert len(rows) == 1250
    for row, rec in zip(rows, pixmor_steps):
        assert (int(row["epoch"]), int(row["step"]), int(row["count"]), row["fallback"]) == (rec.epoch, rec.step, rec.count, "")
        for m in rec.modalities:  # full float64 precision
            assert float(row[f"{m.modality}_score_sum"]) == m.score_sum
            assert float(row[f"{m.modality}_fisher"]) == m.fisher
            assert float(row[f"{m.modality}_proximal"]) == m.factors.proximal


def test_export_epochs_csv_and_jsonl(capsys, target: str) -> None:
    rc, out, _ = regulator(capsys, "export", "syn3", "--what", "epochs", "--format", "csv", "--target", target)
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 22 and rows[-1]["closed"] == "0" and rows[0]["steps"] == "12"
    assert {"audio_fisher_trace", "text_window_open", "visual_growth", "audio_mean_score"} <= set(rows[0])
    assert rows[0]["audio_growth"] == "" and rows[2]["audio_window_open"] == "1"  # NaN growth: empty cell
    rc, out, _ = regulator(capsys, "export", "syn3", "--what", "epochs", "--target", target)
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["epoch"] for x in lines] == list(range(22)) and all(x["type"] == "epoch" for x in lines)
    assert lines[0]["modalities"]["audio"]["growth"] is None  # NaN in the warm-up is null in JSON
    assert lines[2]["modalities"]["audio"]["window_open"] is True


# -- plot ----------------------------------------------------------------------------------------


def test_plot_writes_a_png(capsys, target: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="regulator plot needs matplotlib (pip install matplotlib)")
    png = tmp_path / "syn3.png"
    rc, _, err = regulator(capsys, "plot", "syn3", "-o", str(png), "--dpi", "50", "--target", target)
    assert rc == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_without_matplotlib_says_how_to_install(capsys, target: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, _, err = regulator(capsys, "plot", "syn3", "-o", str(tmp_path / "x.png"), "--target", target)
    assert rc == 2 and "pip install matplotlib" in err
