"""The `regulator` command line as a user runs it (subprocesses): --version, clean startup
failures, --log-level anywhere, replay through a secured regulator, plot's edge cases
(issue 12 item 6)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

import regulator_service
from regulator_cli.main import build_parser
from regulator_client import RegulatorClient
from regulator_client.transport import TlsConfig
from regulator_service.edge.security import TlsFiles, TokenSource
from regulator_service.edge.server import RegulatorServer, ServerConfig

from .conftest import data_file, read_jsonl
from .pki import make_pki

pytestmark = pytest.mark.e2e

TOKEN = "cli-token-0123456789abcdef"


def regulator(*args: str, env: Optional[dict[str, str]] = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "regulator_cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def test_version_is_the_build_info_version() -> None:
    done = regulator("--version")
    assert done.returncode == 0 and done.stdout == f"regulator {regulator_service.__version__}\n"


@pytest.fixture
def taken_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock, sock.getsockname()[1]
    sock.close()


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("regulator serve: "), lines[0]
    return lines[0]


def test_serve_on_a_taken_port_prints_one_line_naming_the_address(taken_port: tuple[socket.socket, int], tmp_path: Path) -> None:
    _, port = taken_port
    line = one_line_error(regulator("serve", "--port", str(port), "--metrics-port", "-1", "--in-memory"))
    assert f"127.0.0.1:{port}" in line and "in use" in line
    # the metrics port and the health port likewise
    line = one_line_error(regulator("serve", "--port", "0", "--metrics-port", str(port), "--in-memory"))
    assert f"127.0.0.1:{port}" in line
    line = one_line_error(regulator("serve", "--port", "0", "--metrics-port", "-1", "--health-port", str(port), "--in-memory"))
    assert f"127.0.0.1:{port}" in line


def test_other_startup_failures_are_one_line_too(tmp_path: Path) -> None:
    base = ["serve", "--port", "0", "--metrics-port", "-1", "--in-memory"]
    missing = str(tmp_path / "missing.pem")
    assert "cannot read TLS files" in one_line_error(regulator(*base, "--tls-cert", missing, "--tls-key", missing))
    pki = make_pki(tmp_path)
    mismatched = one_line_error(regulator(*base, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)))
    assert "do not form a usable pair" in mismatched
    assert "--tls-key" in one_line_error(regulator(*base, "--tls-cert", str(pki.server_cert)))
    assert "token file" in one_line_error(regulator(*base, "--token-file", missing))
    short = tmp_path / "short"
    short.write_text("short")
    assert "at least 16" in one_line_error(regulator(*base, "--token-file", str(short)))
    assert "--health-port" in one_line_error(regulator(*base, "--health-host", "0.0.0.0"))
    assert "--max-concurrent-rpcs" in one_line_error(regulator(*base, "--max-concurrent-rpcs", "-1"))
    assert "--max-history-readers" in one_line_error(regulator(*base, "--max-history-readers", "-1"))
    bad_rate = regulator(*base, "--history-read-rate", "fast")  # an argparse error: usage, then one line
    assert bad_rate.returncode == 2 and "Traceback" not in bad_rate.stderr
    assert "--history-read-rate: not a size: 'fast'" in bad_rate.stderr.strip().splitlines()[-1]
    # gRPC would listen on 99999 modulo 65536 (34463) without a word: every port is range-checked
    for flag in ("--port", "--metrics-port", "--health-port"):
        line = one_line_error(regulator(*base, flag, "99999"))
        assert f"{flag} must be a port, 0 to 65535" in line and "got 99999" in line


def test_log_level_is_accepted_after_the_subcommand(tmp_path: Path) -> None:
    for argv in (["--log-level", "DEBUG", "sessions"], ["sessions", "--log-level", "DEBUG"]):
        assert build_parser().parse_args(argv).log_level == "DEBUG"
    assert build_parser().parse_args(["sessions"]).log_level == "INFO"
    # for real: `serve --log-level WARNING` drops the INFO lines of a clean shutdown
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "regulator_cli", "serve", "--port", "0", "--metrics-port", "-1", "--in-memory",
         "--ready-file", str(ready), "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("regulator serving on")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "state flushed" not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
    bad = regulator("sessions", "--log-level", "LOUD")
    assert bad.returncode == 2 and "LOUD" in bad.stderr


def test_replay_honours_regulator_target_and_reaches_a_mutual_tls_regulator_with_a_token(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    trace = data_file("trace_pix+mor_seed0.jsonl")
    expected = read_jsonl(data_file("trace_pix+mor_seed0_expected_official.jsonl"))
    config = ServerConfig(port=0, tls=TlsFiles(pki.server_cert, pki.server_key, client_ca=pki.ca), token=TokenSource(token=TOKEN))
    with RegulatorServer(config) as srv:
        out = tmp_path / "out.jsonl"
        done = regulator(
            "replay", str(trace), "--profile", "official", "--job-id", "via-env", "-o", str(out),
            "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key),
            env={"REGULATOR_TARGET": f"localhost:{srv.port}", "REGULATOR_TOKEN": TOKEN},
        )
        assert done.returncode == 0, done.stderr
        assert read_jsonl(out) == expected
        assert f"through localhost:{srv.port}" in done.stderr
        tls = TlsConfig(str(pki.ca), str(pki.client_cert), str(pki.client_key))
        with RegulatorClient.connect(f"localhost:{srv.port}", tls=tls, token=TOKEN) as client:
            assert client.get_session("via-env").session.steps == len(expected)  # it ran on this server
        refused = regulator("replay", str(trace), "--tls-ca", str(pki.ca), env={"REGULATOR_TARGET": f"localhost:{srv.port}", "REGULATOR_TOKEN": TOKEN})
        assert refused.returncode == 1 and refused.stderr.startswith("regulator replay: UNAVAILABLE")  # no client certificate
    embedded = regulator("replay", str(trace), "--profile", "official", "--embedded", env={"REGULATOR_TARGET": "127.0.0.1:1"})
    assert embedded.returncode == 0 and [json.loads(x) for x in embedded.stdout.splitlines()] == expected
    assert "embedded regulator" in embedded.stderr


def test_plot_of_a_session_without_steps_fails_and_matplotlib_stays_quiet(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="regulator plot needs matplotlib")
    with RegulatorServer(ServerConfig(port=0)) as srv, RegulatorClient.connect(srv.target) as client:
        client.open_session("empty", ["a", "b"])
        client.open_session("one-step", ["a", "b"])
        client.report("one-step", attempt=0, epoch=0, step=0, count=2, score_sums={"a": 1.0, "b": 1.0}, fisher={"a": 0.5, "b": 0.5})
        env = {"REGULATOR_TARGET": srv.target, "MPLCONFIGDIR": str(tmp_path / "mpl")}  # a cold font cache
        empty = regulator("plot", "empty", "-o", str(tmp_path / "empty.png"), env=env)
        assert empty.returncode == 1 and "has no steps" in empty.stderr and "Traceback" not in empty.stderr
        assert not (tmp_path / "empty.png").exists()
        done = regulator("plot", "one-step", "-o", str(tmp_path / "one.png"), env=env)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "one.png").stat().st_size > 0
        assert (tmp_path / "mpl").exists()  # the font cache was built in this run ...
        assert not re.search(r"INFO matplotlib|fontManager|font cache", done.stderr), done.stderr  # ... silently
        assert done.stderr.splitlines() == [f"plotted 1 steps of job 'one-step' (attempt 0) to {tmp_path / 'one.png'}"]
