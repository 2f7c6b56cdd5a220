"""docs/architecture.md stays true: every module is named there, every path named there exists,
and its two tables of import rules are the ones tests/test_layout.py enforces.

A module added, moved or renamed without the map following fails here, so the map a new engineer
reads first cannot drift from the code.
"""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import ROOT
from .test_layout import LAYERS, ROOM_RULES

DOC = ROOT / "docs" / "architecture.md"
README = ROOT / "README.md"
PACKAGES = ("regulator_service", "client", "cli")
PY_NAME = re.compile(r"[\w./-]*\w\.py\b")
TICKED = re.compile(r"`([^`]+)`")


def modules() -> list[str]:
    """Every module of the three packages, by path from the repository root."""
    return sorted(
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py"
    )


def source_files() -> list[str]:
    """The repository's Python files (its top-level folders, not virtual environments or caches)."""
    folders = [p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "__init__.py").exists()]
    folders += [ROOT / "proto", ROOT / "deploy"]
    return sorted(str(p.relative_to(ROOT)) for folder in folders for p in folder.rglob("*.py"))


def missing_paths(text: str, files: list[str]) -> list[str]:
    """The ``*.py`` names in ``text`` that no file has: a name is a path from the repository root,
    or the tail of one (``edge/servicer.py`` in a picture of regulator_service)."""
    return sorted(
        {name for name in PY_NAME.findall(text) if not any(f == name or f.endswith("/" + name) for f in files)}
    )


def section(text: str, heading: str) -> str:
    """The lines under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next(
        (i for i in range(start, len(lines)) if re.match(rf"^#{{1,{len(level)}}} ", lines[i])),
        len(lines),
    )
    return "\n".join(lines[start:end])


def table(text: str) -> dict[str, list[set[str]]]:
    """A Markdown table's rows: first cell's ticked name -> the ticked names of every other cell."""
    rows: dict[str, list[set[str]]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        rows[TICKED.findall(cells[0])[0]] = [set(TICKED.findall(c)) for c in cells[1:]]
    return rows


def test_every_module_is_named() -> None:
    text = DOC.read_text()
    unnamed = [m for m in modules() if f"`{m}`" not in text]
    assert not unnamed, f"docs/architecture.md does not name (by path, in backticks): {unnamed}"


def test_every_named_path_exists() -> None:
    files = source_files()
    assert not missing_paths(DOC.read_text(), files), "docs/architecture.md names files that do not exist"
    readme = section(README.read_text(), "## Architecture")
    assert not missing_paths(readme, files), "README.md's Architecture section names files that do not exist"


def test_missing_paths_catches_a_moved_module() -> None:
    # the servicer moved into edge/: its old top-level path must be reported, its new one not
    files = source_files()
    assert missing_paths("`regulator_service/servicer.py`, `edge/servicer.py`", files) == ["regulator_service/servicer.py"]


def test_package_table_is_the_layout_rule() -> None:
    rows = table(section(DOC.read_text(), "### Packages"))
    assert set(rows) == set(LAYERS), f"packages in docs/architecture.md {sorted(rows)} vs LAYERS {sorted(LAYERS)}"
    for package, (directory, forbidden) in LAYERS.items():
        named_dir, never = rows[package]
        assert named_dir == {f"{directory.relative_to(ROOT)}/"}, (package, named_dir)
        assert never == forbidden, f"{package}: the doc says never {sorted(never)}, the layout test {sorted(forbidden)}"


def test_room_table_is_the_layout_rule() -> None:
    rows = table(section(DOC.read_text(), "### The rooms of regulator_service"))
    assert set(rows) == set(ROOM_RULES), f"rooms in docs/architecture.md {sorted(rows)} vs ROOM_RULES {sorted(ROOM_RULES)}"
    for room, allowed in ROOM_RULES.items():
        may_import = rows[room][-1]
        assert may_import == allowed, f"{room}: the doc says {sorted(may_import)}, the layout test {sorted(allowed)}"


def test_every_room_directory_is_drawn() -> None:
    picture = section(DOC.read_text(), "## The rooms")
    rooms = [p.name for p in (ROOT / "regulator_service").iterdir() if (p / "__init__.py").exists()]
    undrawn = [room for room in rooms if f"{room}/" not in picture]
    assert not undrawn, f"the picture in docs/architecture.md lacks {undrawn}"
