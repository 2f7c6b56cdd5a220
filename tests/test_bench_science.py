"""`make bench-science`'s bookkeeping (no training): which runs it plans, and how it pairs them."""

from __future__ import annotations

from trainers.bench_science import format_tables, plan, summarize


def test_plan_runs_each_profile_only_where_it_supports_the_modality_count() -> None:
    jobs = plan(["fac+zer", "fac+fou+mor"], ["none", "official", "ogm-ge"], ["fused", "fused+unimodal"], [0, 1], 50, "t")
    three = [j for j in jobs if len(j["views"]) == 3]
    assert {j["profile"] for j in three} == {"none", "ogm-ge"}  # official takes exactly 2 modalities
    assert len(jobs) == 2 * 2 * 3 + 2 * 2 * 2
    assert len({j["job_id"] for j in jobs}) == len(jobs)
    assert {j["unimodal_loss"] for j in jobs} == {False, True}


def _run(profile: str, seed: int, fused: float, weak: float) -> dict:
    return {
        "config": {"views": ["a", "b"], "profile": profile, "seed": seed, "unimodal_loss": False},
        "fused_acc": fused, "unimodal_acc": {"a": 0.9, "b": weak},
        "window_open_epochs": {"a": 2, "b": 0}, "regulated_steps": {"a": 10, "b": 0}, "wall_s": 1.0, "steps": 25,
    }


def test_differences_are_paired_by_seed_and_count_the_seeds_that_improved() -> None:
    runs = [_run("none", 0, 0.90, 0.40), _run("none", 1, 0.92, 0.50), _run("none", 2, 0.91, 0.45),
            _run("official", 1, 0.92, 0.55), _run("official", 0, 0.89, 0.50)]  # seed 2 missing: not paired
    (block,) = summarize(runs)
    d = block["profiles"]["official"]["vs_none"]
    assert d["pairs"] == 2
    mean, wins, n = d["head"]["b"]
    assert (round(mean, 9), wins, n) == (7.5, 2, 2)  # +10 and +5 points
    mean, wins, n = d["fused"]
    assert (round(mean, 9), wins, n) == (-0.5, 0, 2)
    table = format_tables([block])
    assert "Δ official |   -0.5  0/2 |   +0.0  0/2 |   +7.5  2/2" in table
