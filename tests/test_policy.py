"""Policies as pure functions, checked against hand-computed values (no server, no I/O)."""

from __future__ import annotations

import math

import pytest

from regulator_service.policy import (
    CLOSED,
    NoneParams,
    NonePolicy,
    OfficialParams,
    OfficialPolicy,
    PaperParams,
    PaperPolicy,
    Window,
    gaps,
    growth_window,
)
from regulator_service.model import regulated_fisher

OPEN = Window(True, 1.0)


def test_paper_gaps_three_modalities_by_hand() -> None:
    # s1 > s2 > s3: Delta1 = ((s1-s2)+(s1-s3))/2, Delta2 = s2-s3, Delta3 = 0 (inforeg.md, Eq. 9-10)
    s1, s2, s3 = 0.7, 0.5, 0.2
    d = gaps([s2, s1, s3])  # order of modalities must not matter
    assert d[1] == pytest.approx(((0.7 - 0.5) + (0.7 - 0.2)) / 2, abs=1e-15)  # 0.35
    assert d[0] == pytest.approx(0.5 - 0.2, abs=1e-15)  # 0.3
    assert d[2] == 0.0


def test_paper_gaps_ties_do_not_count() -> None:
    # C_m counts strictly lower scores only
    assert gaps([0.5, 0.5, 0.2]) == pytest.approx((0.3, 0.3, 0.0))
    assert gaps([0.4, 0.4]) == (0.0, 0.0)


def test_paper_coefficients_three_modalities_by_hand() -> None:
    pol = PaperPolicy(PaperParams(), ("a", "v", "t"))
    count = 10
    sums = (7.0, 5.0, 2.0)  # scores 0.7, 0.5, 0.2
    coefs = pol.proximal((OPEN, OPEN, OPEN), count, sums)
    assert coefs[0] == pytest.approx(math.exp(0.9 * math.tanh(0.35)), rel=1e-15)  # 1.3589...
    assert coefs[1] == pytest.approx(math.exp(0.9 * math.tanh(0.3)), rel=1e-15)
    assert coefs[2] == 0.0  # the weakest modality is never slowed
    # a closed window silences only its own modality
    coefs = pol.proximal((CLOSED, OPEN, OPEN), count, sums)
    assert coefs[0] == 0.0 and coefs[1] > 1.0


def test_paper_window_eq11_and_edges() -> None:
    pol = PaperPolicy(PaperParams(), ("a", "b"))
    # warm-up: epochs 0 and 1 never open
    assert pol.window(((), ()), 0) == (CLOSED, CLOSED)
    assert pol.window(((1.0,), (1.0,)), 1) == (CLOSED, CLOSED)
    # growth (Tr[t-1] - Tr[t-2]) / Tr[t-1]: 0.2 > 0.04 opens, 0.02 does not
    w = pol.window(((1.0, 1.25), (1.0, 1.0 / 0.98)), 2)
    assert w[0].open and w[0].growth == pytest.approx(0.2)
    assert not w[1].open and w[1].growth == pytest.approx(0.02)
    # a zero Tr[t-2] with a positive Tr[t-1] gives ratio 1: open
    assert growth_window(2.0, 0.0, 0.04) == Window(True, 1.0)
    # closed when Tr[t-1] <= 0 or a trace is not finite
    assert not growth_window(0.0, 1.0, 0.04).open
    assert not growth_window(-1.0, -2.0, 0.04).open
    assert not growth_window(math.inf, 1.0, 0.04).open
    assert not growth_window(1.0, math.nan, 0.04).open


def test_paper_warmup_parameter() -> None:
    pol = PaperPolicy(PaperParams(warmup_epochs=4), ("a", "b"))
    rising = ((1.0, 2.0, 3.0, 4.0), (1.0, 2.0, 3.0, 4.0))
    assert pol.window(rising, 3) == (CLOSED, CLOSED)
    assert all(w.open for w in pol.window(rising, 4))


def test_official_window_history_by_hand() -> None:
    pol = OfficialPolicy(OfficialParams(reference_modality="v"), ("a", "v"))
    assert pol.window(((), ()), 0) == (Window(True, 1.0), Window(True, 1.0))
    # ten zeros then [2.0]: tr1 = 2/10, tr2 = 0 -> k = 1
    assert pol.window(((9.0,), (2.0,)), 1)[0] == Window(True, 1.0)
    # ten zeros then [2, 2]: tr1 = 4/10, tr2 = 2/10 -> k = 0.5; reference modality only
    w = pol.window(((100.0, 0.0), (2.0, 2.0)), 2)
    assert w[0] == w[1] == Window(True, 0.5)
    # a flat history with one small rise: tr1 = (9*20 + 21)/10, tr2 = 20 -> k = 0.1/20.1 < 0.05
    traces = [20.0] * 10 + [21.0]
    w = pol.window(((0.0,) * 11, tuple(traces)), 11)
    assert not w[0].open and w[0].growth == pytest.approx((20.1 - 20.0) / 20.1)
    # a zero tr1 gives NaN: closed
    w = pol.window(((1.0,), (0.0,)), 1)
    assert not w[0].open and math.isnan(w[0].growth)


def test_official_coefficients_and_gains() -> None:
    pol = OfficialPolicy(OfficialParams(reference_modality="a"), ("a", "v"))
    # sums, not means: a leads by 1.5
    assert pol.proximal((OPEN, OPEN), 64, (10.0, 8.5)) == (0.95 * math.exp(math.tanh(1.5)), 0.0)
    assert pol.proximal((OPEN, OPEN), 64, (8.5, 10.0)) == (0.0, 0.1 * math.exp(math.tanh(1.5)))
    assert pol.proximal((OPEN, OPEN), 64, (9.0, 9.0)) == (0.0, 0.0)
    assert pol.proximal((CLOSED, CLOSED), 64, (10.0, 1.0)) == (0.0, 0.0)
    # the reference may be the second modality; gains are parameters
    pol = OfficialPolicy(OfficialParams("v", reference_gain=2.0, other_gain=0.5), ("a", "v"))
    assert pol.proximal((OPEN, OPEN), 64, (1.0, 3.0)) == (0.0, 2.0 * math.exp(math.tanh(2.0)))
    assert pol.proximal((OPEN, OPEN), 64, (3.0, 1.0)) == (0.5 * math.exp(math.tanh(2.0)), 0.0)


def test_none_never_regulates() -> None:
    pol = NonePolicy(NoneParams(), ("a", "b", "c"))
    assert pol.window(((5.0, 9.0),) * 3, 2) == (CLOSED,) * 3
    assert pol.proximal((OPEN,) * 3, 4, (4.0, 0.0, 1.0)) == (0.0, 0.0, 0.0)


def test_regulated_fisher_expansion() -> None:
    # g = [1, -2], d = [0.5, 0.25], numel 2: terms are sums / numel
    g, d, a = [1.0, -2.0], [0.5, 0.25], 1.7
    g2 = sum(x * x for x in g) / 2
    gd = sum(x * y for x, y in zip(g, d)) / 2
    d2 = sum(y * y for y in d) / 2
    direct = sum((x + a * y) ** 2 for x, y in zip(g, d)) / 2
    assert regulated_fisher(g2, gd, d2, a) == pytest.approx(direct, rel=1e-15)
    assert regulated_fisher(g2, gd, d2, 0.0) == g2  # exact when not regulated
