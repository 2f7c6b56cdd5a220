"""Profiles over real gRPC against a real `regulator serve` process (issue 8 item 7, issue 10
item 2): every parameter's range is refused with a message naming it, a profile whose kind is
unset or unknown to this server is INVALID_ARGUMENT (never a silent `paper`), and ogm-ge's
factors are answered, stored, and survive a restart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc
from google.protobuf import any_pb2, wrappers_pb2
from trainers.serverproc import ServerProcess

pytestmark = pytest.mark.e2e

OPEN_METHOD = "/inforeg.regulator.v1.Regulator/OpenSession"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, grpc.Channel]]:
    state = tmp_path_factory.mktemp("profiles-state")
    with ServerProcess(str(state)) as server:
        with grpc.insecure_channel(server.target) as channel:
            yield server, channel


@pytest.fixture
def stub(served: tuple[ServerProcess, grpc.Channel]) -> pb_grpc.RegulatorStub:
    return pb_grpc.RegulatorStub(served[1])


def open_req(job: str, profile: Any = None, mods: tuple[str, ...] = ("a", "b")) -> pb.OpenSessionRequest:
    req = pb.OpenSessionRequest(job_id=job, modalities=list(mods))
    if profile is not None:
        req.profile.CopyFrom(profile)
    return req


def refused(stub: pb_grpc.RegulatorStub, req: Any, method: str = "OpenSession") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return err.value


def assert_not_created(stub: pb_grpc.RegulatorStub, job: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSession(pb.GetSessionRequest(job_id=job), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


BAD_PARAMETERS = [
    ("official threshold -1 keeps the window always open", pb.Profile(official=pb.OfficialProfile(threshold=-1.0)), "official.threshold"),
    ("official threshold 1 never opens", pb.Profile(official=pb.OfficialProfile(threshold=1.0)), "official.threshold"),
    ("official threshold NaN", pb.Profile(official=pb.OfficialProfile(threshold=math.nan)), "official.threshold"),
    ("official history 0", pb.Profile(official=pb.OfficialProfile(history=0)), "official.history"),
    ("official history 10001", pb.Profile(official=pb.OfficialProfile(history=10_001)), "official.history"),
    ("official negative reference gain", pb.Profile(official=pb.OfficialProfile(reference_gain=-0.5)), "official.reference_gain"),
    ("official other gain inf", pb.Profile(official=pb.OfficialProfile(other_gain=math.inf)), "official.other_gain"),
    ("official unknown reference", pb.Profile(official=pb.OfficialProfile(reference_modality="c")), "official.reference_modality"),
    ("paper negative beta", pb.Profile(paper=pb.PaperProfile(beta=-1.0)), "paper.beta"),
    ("paper beta 1e308", pb.Profile(paper=pb.PaperProfile(beta=1e308)), "paper.beta"),
    ("paper negative threshold", pb.Profile(paper=pb.PaperProfile(threshold=-0.2)), "paper.threshold"),
    ("paper warmup 1", pb.Profile(paper=pb.PaperProfile(warmup_epochs=1)), "paper.warmup_epochs"),
    ("paper warmup beyond 2^53", pb.Profile(paper=pb.PaperProfile(warmup_epochs=2**60)), "paper.warmup_epochs"),
    ("ogm-ge negative alpha", pb.Profile(ogm_ge=pb.OgmGeProfile(alpha=-0.8)), "ogm-ge.alpha"),
    ("ogm-ge alpha NaN", pb.Profile(ogm_ge=pb.OgmGeProfile(alpha=math.nan)), "ogm-ge.alpha"),
    ("ogm-ge negative start", pb.Profile(ogm_ge=pb.OgmGeProfile(start_epoch=-1)), "ogm-ge.start_epoch"),
    ("ogm-ge end before start", pb.Profile(ogm_ge=pb.OgmGeProfile(start_epoch=4, end_epoch=3)), "ogm-ge.end_epoch"),
    ("ogm-ge end beyond 2^53", pb.Profile(ogm_ge=pb.OgmGeProfile(end_epoch=2**62)), "ogm-ge.end_epoch"),
]


@pytest.mark.parametrize("name,profile,param", BAD_PARAMETERS, ids=[b[0] for b in BAD_PARAMETERS])
def test_profile_parameter_out_of_range_is_invalid_argument_naming_it(
    stub: pb_grpc.RegulatorStub, name: str, profile: pb.Profile, param: str
) -> None:
    job = "bad-" + param.replace(".", "-").replace("_", "-")
    err = refused(stub, open_req(job, profile))
    assert param in err.details()
    assert_not_created(stub, job)


def test_present_but_unset_profile_is_invalid_argument_never_paper(stub: pb_grpc.RegulatorStub) -> None:
    req = open_req("unset-kind")
    req.profile.SetInParent()  # present, names no kind
    assert req.HasField("profile")
    err = refused(stub, req)
    assert "names no profile" in err.details() and "ogm-ge" in err.details()
    assert_not_created(stub, "unset-kind")


def test_profile_kind_of_a_newer_client_is_invalid_argument(served: tuple[ServerProcess, grpc.Channel]) -> None:
    """Raw bytes as a newer client would send them: Profile field 5 (a kind this server lacks),
    and a PaperProfile with a parameter field 9 it lacks."""
    raw = served[1].unary_unary(OPEN_METHOD, request_serializer=lambda b: b, response_deserializer=pb.OpenSessionResponse.FromString)
    base = pb.OpenSessionRequest(job_id="newer-kind", modalities=["a", "b"]).SerializeToString()
    newer_kind = b"\x2a\x02" + b"\x2a\x00"  # profile { 5: {} }
    with pytest.raises(grpc.RpcError) as err:
        raw(base + newer_kind, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "names no profile" in err.value.details() and "[5]" in err.value.details()
    newer_param = b"\x2a\x04" + b"\x0a\x02" + b"\x48\x01"  # profile { paper { 9: 1 } }
    with pytest.raises(grpc.RpcError) as err:
        raw(base + newer_param, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "profile 'paper' carries parameter field(s) [9]" in err.value.details()
    assert_not_created(pb_grpc.RegulatorStub(served[1]), "newer-kind")


def test_unknown_plugin_profile_is_invalid_argument(stub: pb_grpc.RegulatorStub) -> None:
    packed = any_pb2.Any()
    packed.Pack(wrappers_pb2.DoubleValue(value=1.0))
    err = refused(stub, open_req("unknown-plugin", pb.Profile(plugin=packed)))
    assert "google.protobuf.DoubleValue" in err.details() and "--plugin" in err.details()
    assert_not_created(stub, "unknown-plugin")


def test_only_an_absent_profile_takes_the_default(stub: pb_grpc.RegulatorStub) -> None:
    resp = stub.OpenSession(open_req("absent-profile"), timeout=10)
    assert resp.session.profile == pb.Profile(paper=pb.PaperProfile(beta=0.9, threshold=0.04, warmup_epochs=2))


def stats(a: float, b: float) -> list[pb.ModalityStats]:
    return [pb.ModalityStats(modality="a", score_sum=a, fisher=1e-3), pb.ModalityStats(modality="b", score_sum=b, fisher=2e-3)]


def test_ogm_ge_factors_are_answered_stored_and_survive_a_restart(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    job = "ogm-restart"
    with ServerProcess(state) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RegulatorStub(channel)
        opened = stub.OpenSession(open_req(job, pb.Profile(ogm_ge=pb.OgmGeProfile(alpha=0.5, end_epoch=0))), timeout=10)
        # resolved: every parameter set, the end epoch as given
        assert opened.session.profile.ogm_ge == pb.OgmGeProfile(alpha=0.5, start_epoch=0, end_epoch=0, noise=True)
        answers = []
        for step, (a, b) in enumerate([(30.0, 20.0), (10.0, 10.0), (5.0, 40.0)]):
            r = stub.Report(pb.ReportRequest(job_id=job, epoch=0, step=step, count=64, stats=stats(a, b)), timeout=10)
            answers.append(r.step)
            assert [w.open for w in r.window] == [False, False]  # windows are reported closed
        f = [[m.factors for m in s.modalities] for s in answers]
        assert f[0][0].grad_scale == 1.0 - math.tanh(0.5 * 1.5) and f[0][1].grad_scale == 1.0
        assert (f[1][0].grad_scale, f[1][1].grad_scale) == (1.0, 1.0)  # an exact tie slows nobody
        assert f[2][0].grad_scale == 1.0 and f[2][1].grad_scale == 1.0 - math.tanh(0.5 * 8.0)
        assert all(x.HasField("grad_scale") and x.noise_scale == 1.0 and x.proximal == 0.0 for row in f for x in row)
        end = stub.EndEpoch(pb.EndEpochRequest(job_id=job, epoch=0), timeout=10)
        assert [m.fisher_trace for m in end.closed.modalities] == pytest.approx([3e-3, 6e-3])  # still recorded
        assert [m.regulated_steps for m in end.closed.modalities] == [1, 1]  # slowed steps
        r = stub.Report(pb.ReportRequest(job_id=job, epoch=1, step=3, count=64, stats=stats(30.0, 20.0)), timeout=10)
        # after end_epoch: unscaled, no noise
        assert [(m.factors.grad_scale, m.factors.noise_scale) for m in r.step.modalities] == [(1.0, 0.0), (1.0, 0.0)]
        before = stub.GetSession(pb.GetSessionRequest(job_id=job, include_steps=True), timeout=10)
    with ServerProcess(state) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RegulatorStub(channel)
        after = stub.GetSession(pb.GetSessionRequest(job_id=job, include_steps=True), timeout=10)
        for field in ("epochs", "steps"):
            assert getattr(after, field) == getattr(before, field)
        again = stub.Report(pb.ReportRequest(job_id=job, epoch=0, step=0, count=64, stats=stats(30.0, 20.0)), timeout=10)
        assert again.duplicate and again.step == answers[0]  # the stored scales, not recomputed


def test_a_last_fallback_records_the_scales_and_noise_it_applied(stub: pb_grpc.RegulatorStub) -> None:
    """A client that ran an ogm-ge step without an answer, on its last factors, reports what it
    applied; the history records those scales, not the neutral 1."""
    job = "ogm-fallback"
    stub.OpenSession(open_req(job, pb.Profile(ogm_ge=pb.OgmGeProfile())), timeout=10)
    stub.Report(pb.ReportRequest(job_id=job, epoch=0, step=0, count=64, stats=stats(30.0, 20.0)), timeout=10)

    def fallback(step: int, mode: int, **applied: float) -> pb.ReportRequest:
        s = stats(30.0, 20.0)
        s[0].applied.CopyFrom(pb.Factors(**applied))
        s[1].applied.CopyFrom(pb.Factors(noise_scale=applied.get("noise_scale", 0.0)))
        return pb.ReportRequest(job_id=job, epoch=0, step=step, count=64, stats=s, fallback=mode)

    last = fallback(1, pb.FALLBACK_LAST, grad_scale=0.4, noise_scale=1.0)
    first = stub.Report(last, timeout=10)
    assert [(m.factors.grad_scale, m.factors.noise_scale) for m in first.step.modalities] == [(0.4, 1.0), (1.0, 1.0)]
    again = stub.Report(last, timeout=10)
    assert again.duplicate and again.step == first.step
    err = refused(stub, fallback(2, pb.FALLBACK_NEUTRAL, grad_scale=0.5), "Report")
    assert "a neutral fallback applies no gradient scale" in err.details()
    err = refused(stub, fallback(2, pb.FALLBACK_LAST, grad_scale=-0.5), "Report")
    assert "applied.grad_scale of 'a' must be >= 0" in err.details()
    steps = stub.GetSession(pb.GetSessionRequest(job_id=job, include_steps=True), timeout=10).steps
    assert [s.step for s in steps] == [0, 1]  # the refused reports left nothing behind


def test_digits_trainer_runs_ogm_ge_through_regulator_serve(served: tuple[ServerProcess, grpc.Channel], tmp_path: Path) -> None:
    """`python -m trainers.digits --profile ogm-ge`: the trainer's choices come from the registry,
    its MLP weight matrices are scaled, and a parameter the regulator refuses is one line."""
    import json
    import subprocess
    import sys

    server, channel = served
    out = tmp_path / "result.json"
    base = [sys.executable, "-m", "trainers.digits", "--target", server.target, "--profile", "ogm-ge", "--epochs", "1"]
    proc = subprocess.run([*base, "--job-id", "digits-ogm", "--profile-param", "alpha=0.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    steps = pb_grpc.RegulatorStub(channel).GetSession(pb.GetSessionRequest(job_id="digits-ogm", include_steps=True), timeout=10)
    assert steps.session.profile.ogm_ge.alpha == 0.5
    scaled = [m.factors.grad_scale for s in steps.steps for m in s.modalities if m.factors.grad_scale < 1.0]
    assert scaled and sum(result["regulated_steps"].values()) == len(scaled)
    bad = subprocess.run([*base, "--job-id", "digits-ogm-bad", "--profile-param", "alpha=-1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "INVALID_ARGUMENT: ogm-ge.alpha must be in [0, 100]" in bad.stderr
    assert "Traceback" not in bad.stderr
