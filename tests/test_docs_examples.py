"""The README and docs/ as a reader meets them: every example marked runnable runs on the checkout
(so a broken example fails CI), links resolve, and nothing points outside the repository.

The marking convention (docs/testing.md, "How the examples in the docs are tested"):

- A ```console block is run. Each line that starts with ``$ `` is a command (bash, from a scratch
  directory in which ``examples/``, ``deploy/`` and ``proto/`` are the repository's, with ``.venv/bin`` first on PATH and the
  checkout on PYTHONPATH); the lines after it, up to the next command, are its expected standard
  output, where a line ``...`` stands for any number of lines. No output lines: output unchecked.
- A ```bash block is run as one script (``set -e``); its output is not checked.
- ``<!-- not-run: REASON -->`` on the line before a block: not run (a GPU, Kubernetes, a long
  benchmark, ``make demo`` itself...); the reason is required. ``not-run: covered by
  tests/FILE.py::test_name``: a slow example that a dedicated test runs; that test must exist.
- ``<!-- run-with: server -->`` before a block: the test starts ``regulator serve --in-memory`` on
  a free port and sets ``REGULATOR_TARGET`` for the block's commands.
- ``<!-- run: quickstart -->`` before a ```python block: the script runs against a real
  ``regulator serve``, with the target it names replaced by that server's, and again with
  ``RegulatorClient.in_process()``.
- Other blocks (```python, ```yaml, plain ```) are shown, never run.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from .conftest import ROOT
from .serving import serving

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
MARKER = re.compile(r"^<!--\s*(not-run|run-with|run):\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
COMMAND_TIMEOUT_S = 300  # a liveness bound for one example on a loaded machine
QUICKSTART_TARGET = '"127.0.0.1:50051"'


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: Optional[tuple[str, str]]  # (kind, value) of the comment right above the fence

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, each with the marker comment right above it."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mk = MARKER.match(prev)
        found.append(Block(path, start + 1, lang, "\n".join(body), (mk.group(1), mk.group(2)) if mk else None))
        i += 1
    return found


def console_commands(text: str) -> list[tuple[str, list[str]]]:
    """``$ command`` lines of a console block, each with the output lines that follow it."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"console block: output before the first `$ ` command: {line!r}")
    return out


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Line by line; a line ``...`` matches any number of lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(output_matches(expected[1:], actual[k:]) for k in range(len(actual) + 1))
    return bool(actual) and actual[0] == expected[0] and output_matches(expected[1:], actual[1:])


def runnable(block: Block) -> bool:
    if block.marker and block.marker[0] == "not-run":
        return False
    return block.lang in ("console", "bash") or (block.marker is not None and block.marker[0] == "run")


ALL = [b for p in DOCS for b in blocks(p)]
RUNNABLE = [b for b in ALL if runnable(b)]


def example_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT)}
    env.pop("REGULATOR_TARGET", None)
    return {**env, **(extra or {})}


# What an example may read from the checkout, as if run from its root (linked, never written).
SHARED_DIRS = ("examples", "deploy", "proto")


def scratch(tmp_path: Path) -> Path:
    """A directory to run examples in: what they write stays out of the checkout."""
    work = tmp_path / "work"
    work.mkdir()
    for name in SHARED_DIRS:
        (work / name).symlink_to(ROOT / name)
    return work


def run_shell(script: str, cwd: Path, env: dict[str, str], what: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert "Traceback (most recent call last)" not in proc.stderr, f"{what}: a traceback on stderr\n{proc.stderr}"
    return proc


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> None:
    if block.lang == "console":
        commands = console_commands(block.text)
        assert commands, f"{block.id}: a console block without a `$ ` command"
        for cmd, expected in commands:
            proc = run_shell(cmd, cwd, env, f"{block.id}: $ {cmd}")
            want = [l for l in expected]
            while want and not want[-1].strip():
                want.pop()
            if want:
                got = proc.stdout.splitlines()
                assert output_matches(want, got), f"{block.id}: $ {cmd}\n--- expected\n" + "\n".join(want) + "\n--- got\n" + proc.stdout
    else:
        run_shell("set -e\n" + block.text, cwd, env, block.id)


# -- the docs as a whole (fast) ----------------------------------------------------------------


def test_the_readme_opens_with_the_two_commands_and_stays_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines (at most 300)"
    head = "\n".join(lines[:60])
    assert "make demo" in head and "make test" in head


def test_the_license_is_the_one_pyproject_names() -> None:
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def prose(text: str) -> str:
    """A Markdown text without its code blocks and code spans (where links are not links)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_points_outside_the_repository(path: Path) -> None:
    text = path.read_text()
    for bad in ("../shared", "/work/shared", "shared/spec", "shared/data"):
        assert bad not in text, f"{path.relative_to(ROOT)} mentions {bad}"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose(text)):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{path.relative_to(ROOT)} links outside the repository: {target}"
        assert resolved.exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a file's headings (outside code blocks)."""
    out, fenced = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line) or line.strip() == "```":
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#+ (.+)$", line)):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_anchor_a_doc_links_to_exists(path: Path) -> None:
    text = prose(path.read_text())
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        doc = (path.parent / target).resolve() if target else path
        assert anchor in anchors(doc), f"{path.relative_to(ROOT)} links to {target}#{anchor}: no such heading"


def test_every_marker_is_known_and_says_why() -> None:
    for b in ALL:
        if b.marker is None:
            continue
        kind, value = b.marker
        if kind == "not-run":
            assert value, f"{b.id}: <!-- not-run: ... --> needs a reason"
        elif kind == "run-with":
            assert value == "server", f"{b.id}: unknown run-with {value!r}"
        else:
            assert (value, b.lang) == ("quickstart", "python"), f"{b.id}: <!-- run: quickstart --> marks a python block"


COVERED = re.compile(r"covered by (tests/[\w/]+\.py)::(\w+)")


def test_every_example_left_to_a_test_names_a_test_that_exists() -> None:
    """``<!-- not-run: covered by tests/F.py::name -->``: an example not run here because a
    dedicated test runs the same thing; the test must exist, so the claim stays true."""
    claims = [(b, m) for b in ALL if b.marker and b.marker[0] == "not-run" for m in [COVERED.search(b.marker[1])] if m]
    assert claims, "no example is marked as covered by a test"
    for b, m in claims:
        path = ROOT / m.group(1)
        assert path.is_file(), f"{b.id}: {m.group(1)} does not exist"
        tree = ast.parse(path.read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert m.group(2).startswith("test_") and m.group(2) in names, f"{b.id}: {m.group(1)} has no test {m.group(2)}"
    for b in ALL:
        if b.marker and b.marker[0] == "not-run" and "covered by" in b.marker[1]:
            assert COVERED.search(b.marker[1]), f"{b.id}: write `covered by tests/FILE.py::test_name`"


def test_the_parser_reads_commands_and_their_output() -> None:
    cmds = console_commands("$ echo a\na\n$ true\n$ seq 3\n1\n...\n")
    assert cmds == [("echo a", ["a"]), ("true", []), ("seq 3", ["1", "..."])]
    assert output_matches(["1", "..."], ["1", "2", "3"]) and not output_matches(["2", "..."], ["1", "2"])
    assert output_matches(["...", "3"], ["1", "2", "3"]) and not output_matches(["1"], ["1", "2"])


def test_the_readme_quickstart_is_marked_runnable() -> None:
    quick = [b for b in RUNNABLE if b.marker == ("run", "quickstart")]
    assert [b.path for b in quick] == [ROOT / "README.md"]
    assert quick[0].text.count(QUICKSTART_TARGET) == 1 and "InfoRegHook" in quick[0].text


# -- running them (end to end) -----------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("block", [b for b in RUNNABLE if b.lang != "python"], ids=lambda b: b.id)
def test_example_runs(block: Block, tmp_path: Path) -> None:
    work = scratch(tmp_path)
    if block.marker == ("run-with", "server"):
        with serving(tmp_path, "--metrics-port", "-1") as srv:
            run_block(block, work, example_env({"REGULATOR_TARGET": srv.target}))
    else:
        run_block(block, work, example_env())


@pytest.mark.e2e
def test_the_readme_quickstart_trains_through_regulator_serve_and_in_process(tmp_path: Path) -> None:
    from regulator_client import RegulatorClient

    (quick,) = [b for b in RUNNABLE if b.marker == ("run", "quickstart")]
    work = scratch(tmp_path)
    with serving(tmp_path, "--metrics-port", "-1") as srv:
        script = work / "quickstart.py"
        script.write_text(quick.text.replace(QUICKSTART_TARGET, f'"{srv.target}"'))
        proc = run_shell(f"python {script}", work, example_env(), "the README quickstart")
        with RegulatorClient.connect(srv.target, timeout=30.0) as client:
            session = client.get_session("quickstart", include_steps=True)
        assert [e.epoch for e in session.epochs if e.closed] == [0, 1, 2] and len(session.steps) == 24, proc.stdout
        assert "24 steps reported, 0 without an answer" in proc.stdout
    script.write_text(quick.text.replace(f"RegulatorClient.connect({QUICKSTART_TARGET})", "RegulatorClient.in_process()"))
    proc = run_shell(f"python {script}", work, example_env(), "the README quickstart, in-process")
    assert "24 steps reported, 0 without an answer" in proc.stdout
