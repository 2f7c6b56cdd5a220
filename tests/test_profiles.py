"""Profiles as one registry: ogm-ge against hand-computed values, parameter ranges, and every
derived table (wire, store codec, client, CLI flags) checked against the specs. No server."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_cli.main import build_parser
from regulator_cli.profile_flags import chosen_profile, shared_flags
from regulator_client.profiles import PROFILE_NAMES, make_profile, parse_profile_params, profile_name, profile_params
from regulator_service.wire import profile_wire
from regulator_service.model import EpochSummary, Fallback, StepRecord
from regulator_service.policy import (
    BUILTIN_PROFILES,
    CLOSED,
    OgmGeParams,
    OgmGePolicy,
    ProfileError,
    grad_scales,
)
from regulator_service.storage import codec

OPEN = CLOSED.__class__(True, 1.0)


# -- ogm-ge, by hand ---------------------------------------------------------------------------


def test_ogm_ge_two_modalities_is_the_released_rule() -> None:
    # s_a = 30, s_v = 20: ratio_a = 1.5 > 1, so a is slowed by 1 - tanh(0.8 * 1.5) and v keeps 1
    pol = OgmGePolicy(OgmGeParams(), ("a", "v"))
    f = pol.factors((CLOSED, CLOSED), 0, 64, (30.0, 20.0))
    assert f.grad_scale == (1.0 - math.tanh(0.8 * 1.5), 1.0)
    assert f.grad_scale[0] == pytest.approx(0.1663453930, abs=1e-10)  # 1 - tanh(1.2)
    assert f.proximal == (0.0, 0.0)
    # GE noise goes to every modality's tensors in the range, the slowed one and the other alike
    assert f.noise_scale == (1.0, 1.0)
    # the other way round; relu(ratio), not ratio - 1: the scale is at most 1 - tanh(alpha)
    f = pol.factors((CLOSED, CLOSED), 0, 64, (20.0, 20.000001))
    assert f.grad_scale[0] == 1.0 and f.grad_scale[1] <= 1.0 - math.tanh(0.8) + 1e-6


def test_ogm_ge_exact_tie_slows_nobody_and_zero_scores() -> None:
    pol = OgmGePolicy(OgmGeParams(), ("a", "v"))
    assert pol.factors((), 3, 8, (5.5, 5.5)).grad_scale == (1.0, 1.0)
    assert grad_scales((0.0, 0.0), 0.8) == (1.0, 1.0)  # 0/0: not slowed
    assert grad_scales((2.0, 0.0), 0.8) == (0.0, 1.0)  # s/0 = inf: slowed to 1 - tanh(inf) = 0
    assert grad_scales((2.0, 0.0), 0.0) == (1.0, 1.0)  # alpha 0 never slows (no 0 * inf)


def test_ogm_ge_three_modalities_can_slow_several() -> None:
    s = (9.0, 8.0, 1.0)
    # ratio_0 = 9 / 4.5 = 2, ratio_1 = 8 / 5 = 1.6, ratio_2 = 1 / 8.5
    assert grad_scales(s, 0.5) == pytest.approx((1 - math.tanh(1.0), 1 - math.tanh(0.8), 1.0), rel=1e-15)
    # the modality order does not matter
    assert grad_scales((1.0, 9.0, 8.0), 0.5) == pytest.approx((1.0, 1 - math.tanh(1.0), 1 - math.tanh(0.8)), rel=1e-15)


def test_ogm_ge_epoch_range_and_noise_switch() -> None:
    pol = OgmGePolicy(OgmGeParams(start_epoch=2, end_epoch=4), ("a", "v"))
    for epoch, inside in ((0, False), (1, False), (2, True), (4, True), (5, False)):
        f = pol.factors((), epoch, 64, (30.0, 20.0))
        assert (f.grad_scale[0] < 1.0) == inside, epoch
        assert f.noise_scale == ((1.0, 1.0) if inside else (0.0, 0.0))
        assert f.grad_scale[1] == 1.0
    quiet = OgmGePolicy(OgmGeParams(noise=False), ("a", "v")).factors((), 7, 64, (30.0, 20.0))
    assert quiet.noise_scale == (0.0, 0.0) and quiet.grad_scale[0] < 1.0
    # unbounded by default; windows are reported closed
    assert OgmGePolicy(OgmGeParams(), ("a", "v")).factors((), 10**9, 64, (3.0, 2.0)).grad_scale[0] < 1.0
    assert pol.window(((1.0, 2.0, 4.0), (1.0, 2.0, 4.0)), 3) == (CLOSED, CLOSED)


# -- the registry and its derived tables ---------------------------------------------------------


def test_every_profile_oneof_member_has_a_spec_and_matches_its_message() -> None:
    profile_wire.check_registry(BUILTIN_PROFILES)
    members = {f.name for f in pb.Profile.DESCRIPTOR.oneofs_by_name["kind"].fields} - {"plugin"}
    assert {BUILTIN_PROFILES.get(n).oneof for n in BUILTIN_PROFILES.names()} == members
    assert PROFILE_NAMES == ("paper", "official", "none", "ogm-ge")


def test_defaults_are_resolved_from_the_params_dataclasses() -> None:
    """An empty request resolves to each Params dataclass's own defaults (no literal elsewhere)."""
    mods = ("a", "b")
    for spec in BUILTIN_PROFILES:
        resolved = spec.resolve({}, mods)
        expected = {f.name: f.default for f in dataclasses.fields(spec.params)}
        if spec.name == "official":
            expected["reference_modality"] = "a"  # the modality-dependent default
        assert resolved.values() == expected, spec.name
        # the wire answer carries every parameter (an unbounded end_epoch stays unset)
        answer = profile_wire.profile_to_proto(resolved)
        assert profile_wire.values_from_message(getattr(answer, spec.oneof)) == {
            k: v for k, v in expected.items() if v is not None and not (k == "noise" and v is False)
        }


@pytest.mark.parametrize(
    "profile,params,mods,fragment",
    [
        ("official", {"threshold": -1.0}, ("a", "b"), "official.threshold must be in [0, 1)"),
        ("official", {"threshold": 1.0}, ("a", "b"), "official.threshold must be in [0, 1)"),
        ("official", {"history": 0}, ("a", "b"), "official.history must be in [1, 10000]"),
        ("official", {"reference_gain": math.inf}, ("a", "b"), "official.reference_gain must be finite"),
        ("official", {"other_gain": 101.0}, ("a", "b"), "official.other_gain must be in [0, 100]"),
        ("official", {"reference_modality": "c"}, ("a", "b"), "official.reference_modality 'c' is not one of"),
        ("official", {}, ("a", "b", "c"), "profile 'official' needs exactly 2 modalities, got 3"),
        ("paper", {"beta": -0.1}, ("a", "b"), "paper.beta must be in [0, 100]"),
        ("paper", {"threshold": math.nan}, ("a", "b"), "paper.threshold must be finite"),
        ("paper", {"threshold": -0.5}, ("a", "b"), "paper.threshold must be in [0, 1)"),
        ("paper", {"warmup_epochs": 1}, ("a", "b"), "paper.warmup_epochs must be in [2, 9007199254740991]"),
        ("paper", {"warmup_epochs": 2**53}, ("a", "b"), "paper.warmup_epochs must be in [2, 9007199254740991]"),
        ("ogm-ge", {"alpha": -0.8}, ("a", "b"), "ogm-ge.alpha must be in [0, 100]"),
        ("ogm-ge", {"alpha": 1e308}, ("a", "b"), "ogm-ge.alpha must be in [0, 100]"),
        ("ogm-ge", {"start_epoch": -1}, ("a", "b"), "ogm-ge.start_epoch must be in [0, 9007199254740991]"),
        ("ogm-ge", {"end_epoch": -3}, ("a", "b"), "ogm-ge.end_epoch must be in [0, 9007199254740991]"),
        ("ogm-ge", {"start_epoch": 5, "end_epoch": 4}, ("a", "b"), "ogm-ge.end_epoch (4) must be >= ogm-ge.start_epoch (5)"),
        ("ogm-ge", {"noise": 1}, ("a", "b"), "ogm-ge.noise must be bool"),
        ("ogm-ge", {"beta": 1.0}, ("a", "b"), "profile 'ogm-ge' has no parameter(s) ['beta']"),
        ("none", {}, ("a",), "profile 'none' needs at least 2 modalities, got 1"),
    ],
)
def test_every_parameter_range_is_refused_with_its_name(profile: str, params: dict, mods: tuple, fragment: str) -> None:
    with pytest.raises(ProfileError) as err:
        BUILTIN_PROFILES.get(profile).resolve(params, mods)
    assert fragment in str(err.value)


def test_edges_that_are_valid() -> None:
    paper = BUILTIN_PROFILES.get("paper")
    assert paper.resolve({"threshold": 0.0, "beta": 100.0, "warmup_epochs": 2**53 - 1}, ("a", "b")).params.beta == 100.0
    assert paper.resolve({"beta": -0.0}, ("a", "b")).values()["beta"].hex() == "0x0.0p+0"  # -0.0 stored as 0.0
    ogm = BUILTIN_PROFILES.get("ogm-ge")
    assert ogm.resolve({"start_epoch": 3, "end_epoch": 3, "alpha": 0.0}, ("a", "b", "c")).params.end_epoch == 3


def test_store_codec_reads_the_layout_of_existing_sessions() -> None:
    """Records written before the registry (schema 1) decode to the same profiles."""
    old = {
        "paper": '{"name":"paper","beta":0.9,"threshold":0.04,"warmup_epochs":2}',
        "official": '{"name":"official","reference_modality":"pix","threshold":0.05,"history":10,"reference_gain":0.95,"other_gain":0.1}',
        "none": '{"name":"none"}',
    }
    added = {"official": ',"arithmetic":"exact"'}  # parameters added since take their defaults
    for name, text in old.items():
        profile = codec.profile_from_dict(json.loads(text))
        assert profile.name == name
        # and is written back identically, plus the parameters added since
        assert codec.dumps(codec.profile_to_dict(profile)) == text[:-1] + added.get(name, "") + "}"
    # an old step record (no scales) reads as unscaled
    rec = codec.step_from_json(0, 3, '{"count":4,"score_sums":[1.0,2.0],"fishers":[0.1,0.2],"proximal":[0.0,1.5],"fallback":0,"digest":"00"}')
    assert rec.grad_scale == () and rec.scales() == (1.0, 1.0) and rec.regulated() == (False, True)
    # ogm-ge round trips, with its unbounded end epoch
    ogm = BUILTIN_PROFILES.get("ogm-ge").resolve({"alpha": 0.5}, ("a", "b"))
    assert codec.profile_to_dict(ogm) == {"name": "ogm-ge", "alpha": 0.5, "start_epoch": 0, "end_epoch": None, "noise": True}
    assert codec.profile_from_dict(json.loads(codec.dumps(codec.profile_to_dict(ogm)))) == ogm
    # a profile this server does not know is a clear error, not a KeyError
    with pytest.raises(ProfileError, match="stored profile 'toy' is not known to this server"):
        codec.profile_from_dict({"name": "toy", "gain": 1.0})


def test_scaled_steps_round_trip_and_count_as_regulated() -> None:
    rec = StepRecord(0, 0, 8, (5.0, 3.0), (0.1, 0.2), (0.0, 0.0), Fallback.NONE, b"\x01", (0.25, 1.0), (1.0, 1.0))
    back = codec.step_from_json(0, 0, codec.step_to_json(rec))
    assert back == rec
    summary = EpochSummary.start(0, (CLOSED, CLOSED)).add(rec)
    assert summary.regulated_steps == (1, 0)


def test_client_make_profile_is_derived_from_the_registry() -> None:
    p = make_profile("ogm-ge", alpha=0.5, end_epoch=9, noise=False)
    assert p.WhichOneof("kind") == "ogm_ge"
    assert (p.ogm_ge.alpha, p.ogm_ge.end_epoch, p.ogm_ge.HasField("noise"), p.ogm_ge.noise) == (0.5, 9, True, False)
    assert not p.ogm_ge.HasField("start_epoch")  # unset: the server's default
    assert profile_name(p) == "ogm-ge" and profile_params(p) == {"alpha": 0.5, "end_epoch": 9, "noise": False}
    assert make_profile("paper", beta=1) == pb.Profile(paper=pb.PaperProfile(beta=1.0))
    with pytest.raises(ValueError, match=r"has no parameter\(s\) \['beta'\]"):
        make_profile("ogm-ge", beta=1.0)
    with pytest.raises(ValueError, match="ogm-ge.noise must be bool"):
        make_profile("ogm-ge", noise="yes")
    with pytest.raises(ValueError, match="unknown profile 'ogm'"):
        make_profile("ogm")
    assert parse_profile_params("ogm-ge", ["alpha=0.3", "end-epoch=4", "noise=off"]) == {"alpha": 0.3, "end_epoch": 4, "noise": False}


def test_cli_flags_are_derived_from_the_registry() -> None:
    flags = shared_flags()
    every = {p.name for spec in BUILTIN_PROFILES for p in spec.parameters()}
    assert set(flags) == every
    assert flags["threshold"][1] == ("paper", "official")
    parser = build_parser()
    args = parser.parse_args(["replay", "t.jsonl", "--profile", "ogm-ge", "--alpha", "0.5", "--end-epoch", "3", "--no-noise"])
    spec, params = chosen_profile(args, BUILTIN_PROFILES)
    assert spec.name == "ogm-ge" and params == {"alpha": 0.5, "end_epoch": 3, "noise": False}
    args = parser.parse_args(["replay", "t.jsonl", "--profile", "official", "--alpha", "0.5"])
    with pytest.raises(ProfileError, match="--alpha does not apply to profile 'official'"):
        chosen_profile(args, BUILTIN_PROFILES)
    assert isinstance(args, argparse.Namespace)


def test_registry_refuses_ambiguous_or_broken_declarations(tmp_path: object) -> None:
    from regulator_service.policy import ProfileRegistry
    from regulator_service.policy.registry import import_plugin, plugin_specs

    paper = BUILTIN_PROFILES.get("paper")
    with pytest.raises(ProfileError, match="profile 'paper' is declared twice"):
        ProfileRegistry([paper, paper])
    with pytest.raises(ProfileError, match="needs exactly one of oneof"):
        ProfileRegistry([dataclasses.replace(paper, oneof=None)])
    with pytest.raises(ProfileError, match="default profile 'gentle' is not registered"):
        ProfileRegistry([paper], default="gentle")
    with pytest.raises(ProfileError, match="declares no INFOREG_PROFILES"):
        plugin_specs(argparse, "argparse")
    with pytest.raises(ProfileError, match="must give its message, not a oneof member"):
        plugin_specs(type("M", (), {"INFOREG_PROFILES": [paper]}), "m")
    with pytest.raises(ProfileError, match="plugin file ./nowhere.py does not exist"):
        import_plugin("./nowhere.py")


def test_serve_plugin_flag_is_repeatable_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from regulator_service.serve import add_arguments, plugin_list

    def parse(argv: list[str], env: str | None) -> list[str]:
        if env is None:
            monkeypatch.delenv("REGULATOR_PLUGIN", raising=False)
        else:
            monkeypatch.setenv("REGULATOR_PLUGIN", env)
        parser = argparse.ArgumentParser()
        add_arguments(parser)  # REGULATOR_<FLAG> defaults are read here
        return plugin_list(parser.parse_args(argv).plugin)

    assert parse([], None) == []
    assert parse(["--plugin", "a", "--plugin", "b.c"], None) == ["a", "b.c"]
    assert parse([], "a, ./b.py") == ["a", "./b.py"]
    assert parse(["--plugin", "c"], "a,b") == ["a", "b", "c"]
