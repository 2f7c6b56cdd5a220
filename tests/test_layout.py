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


# The client library reaches the service through one small module only, so that the service's
# rooms can be rearranged without touching the client (regulator_service/client_api.py).
CLIENT_GATEWAY = "regulator_service.client_api"


def service_imports(path: Path) -> set[str]:
    """The regulator_service modules a file imports (``from regulator_service import x`` counts
    as ``regulator_service``: the package itself is not the gateway)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.split(".")[0] == "regulator_service")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "regulator_service":
                out.add(node.module)
    return out


def test_client_imports_the_service_through_one_module() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(service_imports(path) - {CLIENT_GATEWAY})
        for path in sorted((ROOT / "client").rglob("*.py"))
    }
    offenders = {path: bad for path, bad in offenders.items() if bad}
    assert not offenders, f"client/ must import regulator_service only through {CLIENT_GATEWAY}: {offenders}"


# The rooms of regulator_service and the rooms each may import (its own always). "top" is the
# package's top-level modules (serve, client_api, ...): the entry points, they may import any room.
# errors and model are the vocabulary every room shares; policy is pure arithmetic.
SERVICE = ROOT / "regulator_service"
ROOM_RULES: dict[str, set[str]] = {
    "errors": set(),
    "policy": set(),
    "model": {"policy"},
    "storage": {"errors", "model", "policy"},
    "capacity": {"errors", "model", "policy"},
    "core": {"errors", "model", "policy", "storage", "capacity"},
    "wire": {"errors", "model", "policy", "storage", "capacity", "core"},
    "edge": {"errors", "model", "policy", "storage", "capacity", "core", "wire", "package"},
    "top": {"errors", "model", "policy", "storage", "capacity", "core", "wire", "edge", "top", "package"},
}
MAX_TOP_LEVEL_MODULES = 10
MAX_FILE_LINES = 500
MAX_CLASS_LINES = 350


def room_of(module: str) -> str:
    """'regulator_service.core.session' -> 'core'; top-level modules are their own room if
    listed (errors, model), else 'top'; the package itself is 'package'."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return parts[1] if parts[1] in ROOM_RULES and parts[1] != "top" else "top"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def service_targets(path: Path) -> set[str]:
    """The regulator_service modules (or packages) that ``path`` imports, resolved."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None:  # from . import x: x may be a module of that package
                for alias in node.names:
                    sub = ROOT.joinpath(*target.split("."), alias.name)
                    is_module = sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()
                    out.add(f"{target}.{alias.name}" if is_module else target)
            else:
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {t for t in out if t.split(".")[0] == "regulator_service"}


def test_service_rooms_import_only_the_rooms_below() -> None:
    offenders = {}
    for path in sorted(SERVICE.rglob("*.py")):
        room = room_of(module_name(path))
        allowed = ROOM_RULES.get(room, set()) | {room}
        bad = sorted(t for t in service_targets(path) if room_of(t) not in allowed)
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, f"regulator_service rooms import upward ({ROOM_RULES}): {offenders}"


def test_service_is_grouped_into_rooms() -> None:
    top = sorted(p.name for p in SERVICE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"regulator_service/ has {len(top)} top-level modules: {top}"
    rooms = {p.name for p in SERVICE.iterdir() if (p / "__init__.py").exists()}
    assert rooms == set(ROOM_RULES) - {"errors", "model", "top"}, rooms


@pytest.mark.parametrize("package", ["regulator_service", "client"])
def test_no_file_or_class_too_long(package: str) -> None:
    long_files, long_classes = {}, {}
    for path in sorted((ROOT / package).rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long_files[str(path.relative_to(ROOT))] = text.count("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long_classes[f"{path.relative_to(ROOT)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert not long_files and not long_classes, (long_files, long_classes)
