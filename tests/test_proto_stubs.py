"""The committed stubs are exactly what `make proto` generates from the .proto."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from . import oldest_env
from .conftest import ROOT

PROTO_DIR = ROOT / "proto"
PROTO = "inforeg/regulator/v1/regulator.proto"
GENERATED = ["regulator_pb2.py", "regulator_pb2.pyi", "regulator_pb2_grpc.py"]


def test_client_floors_are_the_stubs_own() -> None:
    """The stubs set the grpcio/protobuf floors of every training environment: the gRPC stubs warn
    below the generator's grpcio, the protobuf gencode needs its own protobuf. So pyproject's
    floors are exactly what the committed stubs name, and the gencode has no runtime check that
    would refuse a newer major (gencode from protoc 27+ calls ValidateProtobufRuntimeVersion)."""
    floors = oldest_env.floors()
    grpc_stub = (PROTO_DIR / "inforeg/regulator/v1/regulator_pb2_grpc.py").read_text()
    gencode = (PROTO_DIR / "inforeg/regulator/v1/regulator_pb2.py").read_text()
    assert re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_stub).group(1) == floors.grpcio == floors.generator  # type: ignore[union-attr]
    assert re.search(r"# Protobuf Python Version: ([\d.]+)", gencode).group(1) == floors.protobuf  # type: ignore[union-attr]
    assert "ValidateProtobufRuntimeVersion" not in gencode


@pytest.mark.e2e  # builds (once, cached) the small venv with the pinned generator at the floors
def test_committed_stubs_match_the_proto(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    python = oldest_env.oldest_venv(request.config.cache.mkdir("oldest-client-venv"))
    # The generator's own requirements are the client's floors (it is installed beside exactly them).
    proc = oldest_env.run_old(python, "-c", "from importlib.metadata import requires; print(requires('grpcio-tools'))")
    assert proc.returncode == 0, proc.stderr
    floors = oldest_env.floors()
    assert f"grpcio>={floors.grpcio}" in proc.stdout.replace(" ", "") and f">={floors.protobuf}" in proc.stdout, proc.stdout
    proc = oldest_env.run_old(
        python, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
        f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
        str(PROTO_DIR / PROTO),
    )
    assert proc.returncode == 0, proc.stderr
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
    assert methods == {"OpenSession", "Report", "ReportStream", "EndEpoch", "GetSession", "ListSessions", "CloseSession"}
    # statistics are 64-bit end to end
    for msg in (pb.ModalityStats, pb.FisherTerms, pb.ModalityStep):
        for field in msg.DESCRIPTOR.fields:
            if field.name in {"score_sum", "fisher", "grad_sq", "grad_delta", "delta_sq"}:
                assert field.type == field.TYPE_DOUBLE, (msg.DESCRIPTOR.name, field.name)
