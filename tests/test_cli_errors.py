"""Client-side mistakes on the `regulator` command line, as a user makes them (subprocesses
against real `regulator serve` processes with real certificates): each is one line on stderr,
no traceback, no gRPC core log lines, and a non-zero exit code: 2 for what is wrong on this
side (a flag, a file, a token), 1 for what the network or the regulator answered
(issue 17 item 7)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

from .conftest import data_file
from .pki import Pki, make_pki
from .serving import Served, serving

pytestmark = pytest.mark.e2e

PIXMOR = "trace_pix+mor_seed0.jsonl"


def regulator(*args: str, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    """``regulator ARGS`` with none of the caller's REGULATOR_*/GRPC_* settings, unless given."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REGULATOR_TOKEN", "REGULATOR_TARGET", "GRPC_"))}
    return subprocess.run(
        [sys.executable, "-m", "regulator_cli", *args],
        capture_output=True, text=True, timeout=120, env={**base, **(env or {})},
    )


def one_line(done: subprocess.CompletedProcess[str], command: str, rc: int) -> str:
    """The single stderr line of a failed command; asserts everything else about it."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert done.returncode == rc, (done.returncode, done.stderr)
    assert lines[0].startswith(f"regulator {command}: "), lines[0]
    assert done.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA: its certificate did not sign the regulator's."""
    return make_pki(tmp_path_factory.mktemp("other-pki"))


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[dict[str, Served]]:
    """Three real regulators: plaintext, TLS, and mutual TLS (clients need a certificate)."""
    logs = tmp_path_factory.mktemp("servers")
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    with contextlib.ExitStack() as stack:
        yield {
            "plain": stack.enter_context(serving(logs, "--metrics-port", "-1")),
            "tls": stack.enter_context(serving(logs, "--metrics-port", "-1", *tls)),
            "mtls": stack.enter_context(serving(logs, "--metrics-port", "-1", *tls, "--tls-client-ca", str(pki.ca))),
        }


# -- what is wrong on this side: exit code 2, before any connection ----------------------------


def test_a_short_token_is_one_line_naming_where_it_came_from(tmp_path: Path, servers: dict[str, Served]) -> None:
    target = servers["plain"].target
    line = one_line(regulator("sessions", "--target", target, "--token", "short-secret"), "sessions", 2)
    assert "--token" in line and "at least 16 characters" in line and "(got 12)" in line
    assert "short-secret" not in line  # a token is never printed
    line = one_line(regulator("show", "job", "--target", target, env={"REGULATOR_TOKEN": "abc"}), "show", 2)
    assert "$REGULATOR_TOKEN" in line and "at least 16 characters" in line
    short = tmp_path / "token"
    short.write_text("tiny\n")
    line = one_line(regulator("export", "job", "--target", target, env={"REGULATOR_TOKEN_FILE": str(short)}), "export", 2)
    assert f"$REGULATOR_TOKEN_FILE ({short})" in line and "(got 4)" in line
    line = one_line(regulator("sessions", "--target", target, env={"REGULATOR_TOKEN_FILE": str(tmp_path / "gone")}), "sessions", 2)
    assert "$REGULATOR_TOKEN_FILE" in line and "No such file" in line
    # replay through a remote regulator checks the same way, before it starts
    line = one_line(regulator("replay", str(data_file(PIXMOR)), "--target", target, "--token", "x" * 15), "replay", 2)
    assert "at least 16 characters" in line and "(got 15)" in line


def test_missing_and_wrong_tls_files_are_one_line(tmp_path: Path, pki: Pki, servers: dict[str, Served]) -> None:
    target = servers["tls"].target
    missing = tmp_path / "missing.pem"
    line = one_line(regulator("sessions", "--target", target, "--tls-ca", str(missing)), "sessions", 2)
    assert line == f"regulator sessions: --tls-ca {missing}: No such file or directory"
    line = one_line(regulator("sessions", "--target", target, "--tls-ca", str(pki.server_key)), "sessions", 2)
    assert f"--tls-ca {pki.server_key}: not a PEM CA certificate" in line
    line = one_line(regulator("sessions", "--target", target, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert)), "sessions", 2)
    assert "--tls-cert needs --tls-key" in line
    line = one_line(regulator("sessions", "--target", target, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                              "--tls-key", str(pki.server_key)), "sessions", 2)
    assert "do not form a usable pair" in line


def test_other_local_mistakes_are_one_line(tmp_path: Path, servers: dict[str, Served]) -> None:
    target = servers["plain"].target
    assert "--timeout must be > 0" in one_line(regulator("sessions", "--target", target, "--timeout", "0"), "sessions", 2)
    missing = tmp_path / "missing.jsonl"
    assert str(missing) in one_line(regulator("replay", str(missing)), "replay", 2)


# -- what the network answers: exit code 1, with what it most likely means -----------------------


def test_an_unreachable_target_is_one_line_naming_it() -> None:
    with socket.socket() as s:  # bound, never listening: refuses connections
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
        line = one_line(regulator("sessions", "--target", dead), "sessions", 1)
    assert line.startswith("regulator sessions: UNAVAILABLE: ") and f"is a regulator serving at {dead}?" in line


def test_a_malformed_target_is_one_line() -> None:
    line = one_line(regulator("show", "job", "--target", "no such host::"), "show", 1)
    assert "UNAVAILABLE" in line and "cannot resolve the host of target 'no such host::'" in line
    line = one_line(regulator("sessions", "--target", "127.0.0.1:99999"), "sessions", 1)
    assert "INVALID_ARGUMENT" in line and "99999 is not a port" in line


def test_tls_mismatches_are_one_line_without_grpc_core_logs(pki: Pki, other_pki: Pki, servers: dict[str, Served]) -> None:
    plain, tls, mtls = servers["plain"].target, servers["tls"].target, servers["mtls"].target
    # client TLS to a plaintext regulator
    line = one_line(regulator("sessions", "--target", plain, "--tls-ca", str(pki.ca)), "sessions", 1)
    assert "UNAVAILABLE" in line and f"the regulator at {plain} does not speak TLS" in line and "drop --tls-ca" in line
    # plaintext to a TLS regulator
    line = one_line(regulator("sessions", "--target", tls), "sessions", 1)
    assert f"the regulator at {tls} closed the connection: does it serve TLS? then pass --tls-ca" in line
    # a CA that did not sign the regulator's certificate
    line = one_line(regulator("sessions", "--target", tls, "--tls-ca", str(other_pki.ca)), "sessions", 1)
    assert f"the certificate of the regulator at {tls} is not signed by --tls-ca" in line
    # mutual TLS: no client certificate, then one from another CA
    line = one_line(regulator("sessions", "--target", mtls, "--tls-ca", str(pki.ca)), "sessions", 1)
    assert "does it require a client certificate" in line
    line = one_line(regulator("sessions", "--target", mtls, "--tls-ca", str(pki.ca),
                              "--tls-cert", str(pki.rogue_cert), "--tls-key", str(pki.rogue_key)), "sessions", 1)
    assert "is --tls-cert signed by the CA it trusts?" in line
    # and the right files work
    ok = regulator("sessions", "--target", mtls, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr


def test_grpc_core_logs_stay_off_unless_the_user_asks(pki: Pki, servers: dict[str, Served]) -> None:
    """The same mismatch with the user's own GRPC_VERBOSITY: gRPC core's lines are back (so the
    one line above is the CLI's doing, and a user who debugs gRPC still gets its log)."""
    argv = ("sessions", "--target", servers["plain"].target, "--tls-ca", str(pki.ca))
    loud = regulator(*argv, env={"GRPC_VERBOSITY": "INFO"})
    assert loud.returncode == 1 and "Traceback" not in loud.stderr
    lines = loud.stderr.splitlines()
    assert len(lines) > 1 and lines[-1].startswith("regulator sessions: UNAVAILABLE: "), loud.stderr
    assert any(".cc:" in line for line in lines[:-1]), loud.stderr  # gRPC core's own format


def test_only_client_commands_quiet_grpc_core() -> None:
    """`serve` keeps gRPC's diagnostics (a client's failed handshake is an operator's business);
    the user's own GRPC_VERBOSITY / GRPC_TRACE win; the subcommand is found past --log-level."""
    from regulator_cli.grpc_env import command_of, quiet_grpc_core

    assert command_of(["--log-level", "DEBUG", "serve", "--port", "0"]) == "serve"
    assert command_of(["--log", "DEBUG", "sessions"]) == "sessions"
    assert command_of(["--log-level=DEBUG", "plot", "job"]) == "plot"
    assert command_of(["--version"]) is None
    # grpc is imported in this process already: too late to change anything, so nothing is
    for argv in (["sessions"], ["serve"]):
        env: dict[str, str] = {}
        assert not quiet_grpc_core(argv, env) and env == {}


def test_a_fresh_process_sets_grpc_verbosity_only_for_client_commands() -> None:
    probe = ("import os, sys; from regulator_cli.grpc_env import quiet_grpc_core; "
             "print(quiet_grpc_core(sys.argv[1:], os.environ), os.environ.get('GRPC_VERBOSITY'))")

    def run(*argv: str, env: Optional[dict[str, str]] = None) -> str:
        base = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env={**base, **(env or {})})
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run("sessions") == "True NONE"
    assert run("serve") == "False None"
    assert run("sessions", env={"GRPC_VERBOSITY": "DEBUG"}) == "False DEBUG"
    assert run("sessions", env={"GRPC_TRACE": "tcp"}) == "False None"
