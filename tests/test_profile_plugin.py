"""A new profile is one module: this test module declares a toy profile - its parameter message
(built here with descriptor_pb2, no .proto file), its Params, its pure policy and its spec - and
it works end to end through a real `regulator serve --plugin tests.test_profile_plugin` process
and the client's ``make_profile("toy", ...)``, without any other file knowing about it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_cli.main import main as cli_main
from regulator_client import RegulatorClient
from regulator_client.errors import DataLoss
from regulator_client.profiles import make_profile, profile_name, profile_params
from regulator_service.policy import MAX_EPOCH, ProfileSpec, StepFactors, Window, param
from regulator_service.policy import BUILTIN_PROFILES
from trainers.serverproc import ServerProcess

from .conftest import ROOT, read_jsonl

THIS_MODULE = "tests.test_profile_plugin"

# -- the plugin: everything a profile is -------------------------------------------------------


def _toy_message_class() -> type:
    """``message ToyProfile { optional double gain = 1; optional int64 from_epoch = 2; }`` in
    package inforeg.tests.toy, in a private descriptor pool."""
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="inforeg/tests/toy.proto", package="inforeg.tests.toy", syntax="proto3")
    msg = file.message_type.add(name="ToyProfile")
    for i, (name, kind) in enumerate((("gain", f.TYPE_DOUBLE), ("from_epoch", f.TYPE_INT64))):
        msg.oneof_decl.add(name=f"_{name}")
        msg.field.add(name=name, number=i + 1, type=kind, label=f.LABEL_OPTIONAL, oneof_index=i, proto3_optional=True)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inforeg.tests.toy.ToyProfile"))


ToyProfileMessage = _toy_message_class()


@dataclass(frozen=True)
class ToyParams:
    gain: float = param(0.5, "the leader's proximal coefficient per unit of mean-score lead", low=0.0, high=10.0)
    from_epoch: int = param(1, "windows open from this epoch on", low=0, high=MAX_EPOCH)


@dataclass(frozen=True)
class ToyPolicy:
    """Windows open from ``from_epoch``; the best-scoring modality (strictly) gets
    ``gain * (its mean score - the runner-up's)``, the others 0; a tie slows nobody."""

    params: ToyParams
    modalities: tuple[str, ...]
    name: str = "toy"

    def window(self, traces: Sequence[Sequence[float]], epoch: int) -> tuple[Window, ...]:
        return tuple(Window(epoch >= self.params.from_epoch, float(epoch)) for _ in self.modalities)

    def factors(self, window: Sequence[Window], epoch: int, count: int, score_sums: Sequence[float]) -> StepFactors:
        ranked = sorted(range(len(score_sums)), key=lambda i: -score_sums[i])
        lead = (score_sums[ranked[0]] - score_sums[ranked[1]]) / count
        out = [0.0] * len(score_sums)
        if lead > 0.0 and window[ranked[0]].open:
            out[ranked[0]] = self.params.gain * lead
        return StepFactors(tuple(out))


INFOREG_PROFILES = [
    ProfileSpec(
        name="toy",
        params=ToyParams,
        policy=ToyPolicy,
        summary="test plugin: the leader gets gain * lead",
        min_modalities=2,
        message=ToyProfileMessage,
    )
]


def expected_proximal(scores: tuple[float, float], count: int, gain: float, open_: bool) -> tuple[float, float]:
    lead = (max(scores) - min(scores)) / count
    if not open_ or scores[0] == scores[1]:
        return (0.0, 0.0)
    return (gain * lead, 0.0) if scores[0] > scores[1] else (0.0, gain * lead)


# -- the tests -----------------------------------------------------------------------------------


@pytest.fixture
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server process imports this module by name, as an installed plugin would be."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@pytest.fixture
def registry() -> Iterator:
    yield BUILTIN_PROFILES.with_plugins([THIS_MODULE])


STEPS = [(0, 0, (30.0, 20.0)), (0, 1, (5.0, 9.0)), (1, 2, (30.0, 20.0)), (1, 3, (5.0, 9.0)), (1, 4, (7.0, 7.0))]


@pytest.mark.e2e
def test_toy_plugin_profile_works_end_to_end_through_regulator_serve(tmp_path: Path, importable: None, registry: object) -> None:
    state = str(tmp_path / "state")
    job = "toy-run"
    with ServerProcess(state, extra_args=["--plugin", THIS_MODULE]) as server:
        with RegulatorClient.connect(server.target, timeout=10.0) as client:
            profile = make_profile("toy", registry=registry, gain=2.0)
            assert profile.WhichOneof("kind") == "plugin"
            assert profile.plugin.type_url == "type.googleapis.com/inforeg.tests.toy.ToyProfile"
            opened = client.open_session(job, ["a", "b"], profile)
            # the answer is the resolved profile: the given gain, the declared default from_epoch
            assert profile_name(opened.session.profile, registry) == "toy"
            assert profile_params(opened.session.profile, registry) == {"gain": 2.0, "from_epoch": 1}
            epoch = 0
            for e, step, scores in STEPS:
                if e != epoch:
                    end = client.end_epoch(job, attempt=0, epoch=epoch)
                    assert [w.open for w in end.next_window] == [True, True]
                    epoch = e
                r = client.report(job, attempt=0, epoch=e, step=step, count=64,
                                  score_sums=dict(zip("ab", scores)), fisher={"a": 1e-3, "b": 1e-3})
                got = tuple(m.factors.proximal for m in r.step.modalities)
                assert got == pytest.approx(expected_proximal(scores, 64, 2.0, e >= 1), rel=1e-15)
                assert not any(m.factors.HasField("grad_scale") for m in r.step.modalities)
            # its parameter ranges are enforced by the server, naming the parameter
            with pytest.raises(Exception) as err:
                client.open_session("toy-bad", ["a", "b"], make_profile("toy", registry=registry, gain=11.0))
            assert "toy.gain must be in [0, 10]" in str(err.value)
            before = client.get_session(job, include_steps=True)
    # a restart with the plugin restores the session from the state file
    with ServerProcess(state, extra_args=["--plugin", THIS_MODULE]) as server:
        with RegulatorClient.connect(server.target, timeout=10.0) as client:
            after = client.get_session(job, include_steps=True)
            assert (after.epochs, after.steps) == (before.epochs, before.steps)
            assert profile_name(after.session.profile, registry) == "toy"
    # without the plugin, the stored session cannot be decoded: it is quarantined (listed as
    # CORRUPT, with a reason naming the flag) while every other session serves; its rows stay
    # untouched, so a restart with the plugin serves it again
    with ServerProcess(state) as server:
        with RegulatorClient.connect(server.target, timeout=10.0) as client:
            (listed,) = [s for s in client.list_sessions(include_inactive=True) if s.job_id == job]
            assert listed.state == pb.SESSION_STATE_CORRUPT
            assert "stored profile 'toy' is not known to this server" in listed.state_reason
            assert "--plugin" in listed.state_reason
            with pytest.raises(DataLoss):
                client.get_session(job)
    with ServerProcess(state, extra_args=["--plugin", THIS_MODULE]) as server:
        with RegulatorClient.connect(server.target, timeout=10.0) as client:
            again = client.get_session(job, include_steps=True)
            assert (again.epochs, again.steps) == (before.epochs, before.steps)
    # a server without the plugin refuses the profile, naming its type and the flag
    with ServerProcess(None) as server, grpc.insecure_channel(server.target) as channel:
        from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc

        with pytest.raises(grpc.RpcError) as rpc:
            pb_grpc.RegulatorStub(channel).OpenSession(
                pb.OpenSessionRequest(job_id="toy-elsewhere", modalities=["a", "b"], profile=make_profile("toy", registry=registry)),
                timeout=10,
            )
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inforeg.tests.toy.ToyProfile" in rpc.value.details() and "--plugin" in rpc.value.details()


def test_toy_plugin_replays_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`regulator replay --plugin MODULE --profile toy --param gain=...`: the plugin's parameters
    come from its spec, through the embedded server."""
    trace = tmp_path / "t.jsonl"
    lines = ['{"type": "session", "modalities": ["a", "b"]}']
    epoch = 0
    for e, step, (sa, sb) in STEPS:
        if e != epoch:
            lines.append(f'{{"type": "epoch_end", "epoch": {epoch}}}')
            epoch = e
        lines.append(f'{{"type": "step", "epoch": {e}, "step": {step}, "count": 64, "score_sum": {{"a": {sa}, "b": {sb}}}, "fisher": {{"a": 0.001, "b": 0.001}}}}')
    trace.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["replay", str(trace), "--plugin", THIS_MODULE, "--profile", "toy", "--param", "gain=3", "--param", "from_epoch=0", "-o", str(out)]
    assert cli_main(args) == 0
    got = [tuple(line["factors"].values()) for line in read_jsonl(out)]
    assert got == [pytest.approx(expected_proximal(s, 64, 3.0, True), rel=1e-15) for _, _, s in STEPS]
    capsys.readouterr()
    assert cli_main(["replay", str(trace), "--plugin", THIS_MODULE, "--profile", "toy", "--param", "gain=-1"]) == 1
    assert "INVALID_ARGUMENT: toy.gain must be in [0, 10], got -1.0" in capsys.readouterr().err


def test_a_broken_plugin_stops_serve_with_one_line(tmp_path: Path, importable: None) -> None:
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("INFOREG_PROFILES = ['not a spec']\n")
    for plugin, fragment in ((str(bad), "holds 'not a spec', not a ProfileSpec"), ("no_such_module_xyz", "cannot import plugin 'no_such_module_xyz'")):
        proc = subprocess.run(
            [sys.executable, "-m", "regulator_cli", "serve", "--port", "0", "--metrics-port", "-1", "--in-memory", "--plugin", plugin],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 1
        assert fragment in proc.stderr and "Traceback" not in proc.stderr


def test_plugin_spec_must_match_its_message() -> None:
    from regulator_service.wire.profile_wire import load_registry
    from regulator_service.policy import ProfileError

    @dataclass(frozen=True)
    class Mismatched:
        gain: float = param(0.5, "")
        other: int = param(0, "")

    spec = ProfileSpec("mismatch", Mismatched, ToyPolicy, "", message=ToyProfileMessage)
    with pytest.raises(ProfileError, match="has fields \\['from_epoch', 'gain'\\] but the parameters are \\['gain', 'other'\\]"):
        load_registry([], BUILTIN_PROFILES.extended([spec]))
    assert math.isfinite(ToyParams().gain)
