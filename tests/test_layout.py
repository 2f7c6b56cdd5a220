"""The packages depend one way: regulator_cli -> regulator_client -> regulator_service -> inforeg.

Checked on the source (every import statement, also those inside functions), so a cycle cannot
sneak back in through a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

# package -> (directory, packages it must never import)
LAYERS = {
    "inforeg": (ROOT / "proto" / "inforeg", {"regulator_service", "regulator_client", "regulator_cli", "trainers"}),
    "regulator_service": (ROOT / "regulator_service", {"regulator_client", "regulator_cli", "trainers"}),
    "regulator_client": (ROOT / "client", {"regulator_cli", "trainers"}),
    "regulator_cli": (ROOT / "cli", {"trainers"}),
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_dependencies_run_one_way(package: str) -> None:
    directory, forbidden = LAYERS[package]
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & forbidden)
        for path in sorted(directory.rglob("*.py"))
    }
    offenders = {path: bad for path, bad in offenders.items() if bad}
    assert not offenders, f"{package} must not import {sorted(forbidden)}: {offenders}"
