"""The client at the oldest grpcio and protobuf pyproject.toml accepts, against the newest server.

A second venv (tests/oldest_env.py) holds exactly the floors (grpcio 1.63.0, protobuf 5.26.1) and
takes torch and this checkout from the main venv; the server's packages are unimportable there,
as in a client-only install. A real digits job trains through a `regulator serve` of the main venv
(newest grpcio and protobuf) and in-process, and both must apply exactly the factors the newest
environment applies in-process: the statistics traces are identical, step by step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from regulator_client import RegulatorClient

from . import oldest_env
from .conftest import read_jsonl
from .serving import serving

pytestmark = pytest.mark.e2e

JOB = ["--profile", "official", "--views", "fac", "zer", "--epochs", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def old_python(request: pytest.FixtureRequest) -> Path:
    return oldest_env.oldest_venv(request.config.cache.mkdir("oldest-client-venv"))


def test_the_old_venv_runs_the_floors_without_the_server_packages(old_python: Path) -> None:
    floors = oldest_env.floors()
    found = oldest_env.versions_of(old_python)
    assert (found["grpcio"], found["protobuf"]) == (floors.grpcio, floors.protobuf), found
    own = old_python.parent.parent
    assert own in Path(found["grpc_path"]).parents and own in Path(found["protobuf_path"]).parents, found
    for module in oldest_env.SERVER_ONLY:
        assert oldest_env.run_old(old_python, "-c", f"import {module}").returncode != 0, module
    # `regulator serve` there says in one line what to install; the client commands work (below).
    proc = oldest_env.run_old(old_python, "-m", "regulator_cli", "serve", "--port", "0")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "pip install '.[server]'" in proc.stderr, proc.stderr


def test_a_job_at_the_floors_trains_as_the_newest_does(tmp_path: Path, old_python: Path) -> None:
    import sys

    traces = {name: tmp_path / f"{name}.jsonl" for name in ("old-grpc", "old-in-process", "new-in-process")}
    # The two in-process runs train while the gRPC one does (three processes; bounded by the slowest).
    in_process = {
        name: oldest_env.start_old(python, "-m", "trainers.digits", "--in-process", *JOB,
                                   "--record", str(traces[name]), log=tmp_path / f"{name}.log")
        for name, python in (("old-in-process", old_python), ("new-in-process", Path(sys.executable)))
    }
    try:
        with serving(tmp_path, "--metrics-port", "-1") as server:
            proc = oldest_env.run_old(
                old_python, "-m", "trainers.digits", "--target", server.target, *JOB,
                "--job-id", "oldest", "--record", str(traces["old-grpc"]),
            )
            assert proc.returncode == 0, proc.stderr
            listed = oldest_env.run_old(old_python, "-m", "regulator_cli", "sessions", "--all", "--target", server.target)
            assert listed.returncode == 0 and "oldest" in listed.stdout, listed.stdout + listed.stderr
            with RegulatorClient.connect(server.target, timeout=30.0) as client:
                detail = client.get_session("oldest", include_steps=True)
        for name, run in in_process.items():
            assert run.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()
    finally:
        for run in in_process.values():
            if run.poll() is None:
                run.kill()
                run.wait()

    reference = read_jsonl(traces["new-in-process"])
    assert len([e for e in reference if e["type"] == "step"]) == len(detail.steps) == 2 * 25
    # Some step was regulated (a proximal term), so equal traces mean equal factors.
    assert any(m.factors.proximal > 0.0 for s in detail.steps for m in s.modalities)
    for name in ("old-grpc", "old-in-process"):
        assert read_jsonl(traces[name]) == reference, f"{name} trained differently from the newest in-process run"
