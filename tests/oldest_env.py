"""A second, small venv at the oldest grpcio and protobuf the client supports (pyproject's floors).

It holds only ``grpcio``, ``protobuf`` and the stubs' generator (``grpcio-tools``, pinned in
``[tool.inforeg-regulator]``: its own requirements are exactly the floors). Everything else (torch,
scikit-learn, this checkout's editable install) comes from the main venv, appended *after* the old
venv's site-packages by a ``.pth`` file, so ``import grpc, google.protobuf`` finds the old ones and
nothing big is installed twice. The server's packages (grpcio-health-checking, grpcio-reflection,
prometheus-client) are made unimportable there, as in a client-only install.

Built once per set of versions under pytest's cache directory (gitignored), from PyPI.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a client-only install (`pip install inforeg-regulator`, no [server]) does not have.
SERVER_ONLY = ("grpc_health", "grpc_reflection", "prometheus_client")

_SITE_HOOK = '''"""Loaded by inforeg-oldest.pth (tests/oldest_env.py): the main venv's packages after this
venv's own, and the server-only packages unimportable, as in a client-only install."""
import site
import sys

site.addsitedir({main_site!r})


class _NotInstalled:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (a client-only install)", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled)
'''


@dataclass(frozen=True)
class Floors:
    grpcio: str
    protobuf: str
    generator: str  # grpcio-tools version

    @property
    def key(self) -> str:
        """The cache key: these versions, this Python and the main venv the .pth file points to."""
        import hashlib

        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        main = hashlib.sha256(main_site().encode()).hexdigest()[:8]
        return f"py{py}-grpcio{self.grpcio}-protobuf{self.protobuf}-tools{self.generator}-{main}"


def main_site() -> str:
    """The site-packages of the interpreter running the tests (torch and this checkout live there)."""
    return site.getsitepackages()[0]


def floors() -> Floors:
    """The ``>=`` floors of grpcio and protobuf in pyproject's dependencies, and the pinned generator."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = {Requirement(r).name: Requirement(r) for r in project["project"]["dependencies"]}

    def lowest(name: str) -> str:
        (floor,) = [s.version for s in deps[name].specifier if s.operator == ">="]
        return floor

    generator = Requirement(project["tool"]["inforeg-regulator"]["stub-generator"])
    assert generator.name == "grpcio-tools", generator
    (pin,) = [s.version for s in generator.specifier if s.operator == "=="]
    return Floors(grpcio=lowest("grpcio"), protobuf=lowest("protobuf"), generator=pin)


def oldest_venv(cache: Path) -> Path:
    """The python of a venv at the floors under ``cache`` (built on first use, then reused)."""
    f = floors()
    venv = cache / f.key
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    # Tests on several pytest-xdist workers may want it at once: one builds, the others wait.
    with open(cache / f"{f.key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".complete").exists():
            return python
        _build(f, venv)
    return python


def _build(f: Floors, venv: Path) -> None:
    cache = venv.parent
    building = cache / f"{f.key}.building"
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(building)], check=True)
    # The main venv's pip installs into it (--python): no pip bootstrapped there. Wheels only.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(building / "bin" / "python"), "install", "--quiet",
         "--disable-pip-version-check", "--only-binary", ":all:",
         f"grpcio=={f.grpcio}", f"protobuf=={f.protobuf}", f"grpcio-tools=={f.generator}"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, f"cannot install the floors from PyPI:\n{proc.stdout}{proc.stderr}"
    (own_site,) = (building / "lib").glob("python3*/site-packages")
    (own_site / "_inforeg_oldest.py").write_text(
        _SITE_HOOK.format(main_site=main_site(), blocked=set(SERVER_ONLY))
    )
    (own_site / "inforeg-oldest.pth").write_text("import _inforeg_oldest\n")
    shutil.rmtree(venv, ignore_errors=True)
    building.rename(venv)
    # venv's scripts name the path it was created at; only bin/python (a symlink) is used here.
    (venv / ".complete").touch()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run_old(python: Path, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in the old venv, from the repository root (trainers/ is imported from there)."""
    return subprocess.run([str(python), *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def start_old(python: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """``python ARGS`` like ``run_old``, started in the background (its output in ``log``)."""
    with open(log, "wb") as out:
        return subprocess.Popen([str(python), *args], cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)


def versions_of(python: Path) -> dict[str, str]:
    """What ``import grpc, google.protobuf`` gives in that interpreter, and where from."""
    code = (
        "import grpc, google.protobuf as p, json; "
        "print(json.dumps({'grpcio': grpc.__version__, 'protobuf': p.__version__, "
        "'grpc_path': grpc.__file__, 'protobuf_path': p.__file__}))"
    )
    proc = run_old(python, "-c", code)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
