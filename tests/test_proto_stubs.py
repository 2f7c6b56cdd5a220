"""The committed stubs are exactly what `make proto` generates from the .proto."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

PROTO_DIR = ROOT / "proto"
PROTO = "inforeg/regulator/v1/regulator.proto"
GENERATED = ["regulator_pb2.py", "regulator_pb2.pyi", "regulator_pb2_grpc.py"]


def test_generator_is_the_pinned_one() -> None:
    """The stubs' generator sets the grpcio/protobuf floors of every training environment (the
    stubs refuse older runtimes), so it is pinned in the dev extra and the floors follow it."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (tools,) = [Requirement(r) for r in project["optional-dependencies"]["dev"] if Requirement(r).name == "grpcio-tools"]
    (pin,) = [str(s.version) for s in tools.specifier if s.operator == "=="]
    assert version("grpcio-tools") == pin, (
        f"grpcio-tools {version('grpcio-tools')} is installed, the dev extra pins {pin} (it sets the stubs' floors): "
        f"`make proto` installs it and regenerates"
    )
    core = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    generated = (PROTO_DIR / "inforeg/regulator/v1/regulator_pb2_grpc.py").read_text()
    grpc_floor = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", generated).group(1)  # type: ignore[union-attr]
    assert grpc_floor == pin
    gencode = re.search(r"# Protobuf Python Version: ([\d.]+)", (PROTO_DIR / "inforeg/regulator/v1/regulator_pb2.py").read_text()).group(1)  # type: ignore[union-attr]
    for name, floor in (("grpcio", grpc_floor), ("protobuf", gencode)):
        lowest = min((Version(s.version) for s in core[name].specifier if s.operator == ">="), default=None)
        assert lowest == Version(floor), f"pyproject's {core[name]} should start at what the stubs demand: {floor}"


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            str(PROTO_DIR / PROTO),
        ],
        check=True,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "inforeg/regulator/v1" / name).read_bytes()
        != (PROTO_DIR / "inforeg/regulator/v1" / name).read_bytes()
    ]
    assert not stale, f"stubs drifted from {PROTO}: {stale}; run `make proto` and commit"


def test_contract_is_versioned_and_names_its_factors() -> None:
    from inforeg.regulator.v1 import regulator_pb2 as pb

    assert pb.DESCRIPTOR.package == "inforeg.regulator.v1"
    assert set(pb.Factors.DESCRIPTOR.fields_by_name) == {"proximal", "grad_scale", "noise_scale"}
    methods = set(pb.DESCRIPTOR.services_by_name["Regulator"].methods_by_name)
    assert methods == {"OpenSession", "Report", "EndEpoch", "GetSession", "ListSessions", "CloseSession"}
    # statistics are 64-bit end to end
    for msg in (pb.ModalityStats, pb.FisherTerms, pb.ModalityStep):
        for field in msg.DESCRIPTOR.fields:
            if field.name in {"score_sum", "fisher", "grad_sq", "grad_delta", "delta_sq"}:
                assert field.type == field.TYPE_DOUBLE, (msg.DESCRIPTOR.name, field.name)
