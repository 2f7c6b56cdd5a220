"""`regulator replay` reproduces the recorded coefficients, through a real embedded gRPC server."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from regulator_cli.main import main as cli_main

from .conftest import data_file, read_jsonl
from .spec_reference import reference_ogm_ge, reference_replay

CASES = [
    ("trace_pix+mor_seed0.jsonl", "official", "trace_pix+mor_seed0_expected_official.jsonl"),
    ("trace_pix+mor_seed0.jsonl", "paper", "trace_pix+mor_seed0_expected_paper.jsonl"),
    ("synthetic_3mod_seed11.jsonl", "paper", "synthetic_3mod_seed11_expected_paper.jsonl"),
]


def assert_factors_match(got: list[dict], expected: list[dict], rel: float = 1e-9) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g["epoch"], g["step"]) == (e["epoch"], e["step"])
        assert set(g["factors"]) == set(e["factors"])
        for m, v in e["factors"].items():
            assert g["factors"][m] == pytest.approx(v, rel=rel, abs=0.0), (e["step"], m)


@pytest.mark.parametrize("trace,profile,expected", CASES)
def test_replay_reproduces_expected(tmp_path: Path, trace: str, profile: str, expected: str) -> None:
    out = tmp_path / "out.jsonl"
    assert cli_main(["replay", str(data_file(trace)), "--profile", profile, "-o", str(out)]) == 0
    assert_factors_match(read_jsonl(out), read_jsonl(data_file(expected)))


def test_replay_console_script_prints_trace_format(tmp_path: Path) -> None:
    """The installed `regulator` entry point, as a user runs it; output goes to stdout."""
    trace = data_file("synthetic_3mod_seed11.jsonl")
    proc = subprocess.run(
        [sys.executable, "-m", "regulator_cli", "replay", str(trace), "--profile", "paper"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert_factors_match(lines, read_jsonl(data_file("synthetic_3mod_seed11_expected_paper.jsonl")))
    assert "replayed 252 steps" in proc.stderr
    # keys and separators exactly as in trace-format.md
    assert proc.stdout.splitlines()[0].startswith('{"epoch": 0, "step": 0, "factors": {"audio": ')


def random_trace(seed: int, modalities: list[str]) -> tuple[dict, list[dict]]:
    """Windows that open and close, tied scores, zero-trace epochs, short last batches."""
    rng = random.Random(seed)
    header = {"type": "session", "modalities": modalities, "reference_modality": modalities[-1]}
    events: list[dict] = []
    step = 0
    level = {m: rng.uniform(1e-4, 1e-3) for m in modalities}
    for epoch in range(rng.randint(3, 25)):
        zero_epoch = rng.random() < 0.1
        for m in modalities:
            level[m] *= rng.choice([0.5, 0.9, 1.0, 1.1, 1.5, 3.0])
        n_steps = rng.randint(1, 12)
        for i in range(n_steps):
            count = 64 if i < n_steps - 1 else rng.randint(1, 64)
            base = round(rng.uniform(0, count), 3)
            scores = {m: base if rng.random() < 0.3 else round(rng.uniform(0, count), 4) for m in modalities}
            fisher = {m: 0.0 if zero_epoch else level[m] * rng.uniform(0.5, 1.5) / n_steps for m in modalities}
            events.append({"type": "step", "epoch": epoch, "step": step, "count": count, "score_sum": scores, "fisher": fisher})
            step += 1
        events.append({"type": "epoch_end", "epoch": epoch})
    return header, events


@pytest.mark.parametrize("seed", range(6))
def test_replay_matches_independent_reference_on_random_traces(tmp_path: Path, seed: int) -> None:
    mods = ["a", "b"] if seed % 2 == 0 else ["x", "y", "z", "w"][: 2 + seed % 3]
    header, events = random_trace(seed, mods)
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps(x) for x in [header, *events]) + "\n")
    profiles = ["paper", "none"] + (["official"] if len(mods) == 2 else [])
    for profile in profiles:
        extra = ["--threshold", "0.01"] if profile == "paper" and seed == 4 else []
        params = {"threshold": 0.01} if extra else {}
        out = tmp_path / f"{profile}.jsonl"
        assert cli_main(["replay", str(trace), "--profile", profile, "-o", str(out), *extra]) == 0
        expected = reference_replay(header, events, profile, **params)
        got = read_jsonl(out)
        assert_factors_match(got, expected, rel=1e-12)
        if profile != "none":
            assert any(v > 0 for line in got for v in line["factors"].values()), "trace never regulates"


def test_replay_rejects_malformed_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "session", "modalities": ["a", "b"]}\n{"type": "step", "epoch": 0}\n')
    assert cli_main(["replay", str(bad), "--profile", "paper"]) == 2
    assert "line 2: missing 'step'" in capsys.readouterr().err


def test_replay_to_an_unwritable_output_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "no-such-dir" / "out.jsonl"
    assert cli_main(["replay", str(data_file("trace_pix+mor_seed0.jsonl")), "--profile", "official", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"regulator replay: {out}: No such file or directory\n"


OGM_CASES = [  # (modalities, replay flags, reference parameters)
    (["a", "b"], [], {}),
    (["a", "b"], ["--alpha", "2.5", "--start-epoch", "1", "--end-epoch", "3"], {"alpha": 2.5, "start_epoch": 1, "end_epoch": 3}),
    (["x", "y", "z"], ["--alpha", "0.3"], {"alpha": 0.3}),
    (["x", "y", "z", "w"], ["--start-epoch", "2", "--no-noise"], {"start_epoch": 2}),
]


@pytest.mark.parametrize("seed", range(8))
def test_replay_ogm_ge_matches_independent_reference_on_generated_traces(tmp_path: Path, seed: int) -> None:
    """`regulator replay --profile ogm-ge` against scales computed from the spec alone
    (tests/spec_reference.py), on generated traces with ties, zero scores and 2-4 modalities."""
    mods, flags, params = OGM_CASES[seed % len(OGM_CASES)]
    header, events = random_trace(100 + seed, mods)
    rng = random.Random(seed)
    for ev in events:  # zero score sums too: a 0/0 ratio slows nobody, s/0 slows fully
        if ev["type"] == "step" and rng.random() < 0.05:
            ev["score_sum"][rng.choice(mods)] = 0.0
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps(x) for x in [header, *events]) + "\n")
    out = tmp_path / "ogm.jsonl"
    assert cli_main(["replay", str(trace), "--profile", "ogm-ge", "-o", str(out), *flags]) == 0
    got, expected = read_jsonl(out), reference_ogm_ge(header, events, **params)
    assert_factors_match(got, expected)
    slowed = 0
    for g, e in zip(got, expected):
        assert set(g["grad_scale"]) == set(mods)
        for m in mods:
            assert g["grad_scale"][m] == pytest.approx(e["grad_scale"][m], rel=1e-9, abs=0.0), (e["step"], m)
        slowed += sum(v < 1.0 for v in g["grad_scale"].values())
    assert slowed > 0, "the trace never slows a modality"
    if len(mods) > 2:
        assert any(sum(v < 1.0 for v in g["grad_scale"].values()) > 1 for g in got), "never two slowed at once"
