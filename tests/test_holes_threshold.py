"""The window thresholds at their exact edge, through the public API (an in-process regulator).

Both profiles open a window only when the growth statistic is strictly above the threshold
(docs/profiles.md): ``official`` while ``k > threshold``, ``paper`` when
``(Tr[t-1] - Tr[t-2]) / Tr[t-1] > threshold``. The traces below make the statistic equal the
threshold bit for bit (every value is a small dyadic fraction, so each sum, mean and quotient is
exact in float64); the test recomputes the statistic itself and checks that equality before it
checks the decision, and a threshold one ulp lower shows the same traces do open the window."""

from __future__ import annotations

import math

from regulator_client import RegulatorClient

THRESHOLD = 0.25  # exactly representable
BELOW = math.nextafter(THRESHOLD, 0.0)  # one ulp lower: the same statistic is above it


def run_three_epochs(profile: str, threshold: float, ref_traces: tuple[float, float], **params: object) -> tuple[list, dict]:
    """A two-modality job with one step per epoch: epochs 0 and 1 record the given Fisher
    values (both modalities alike), epoch 2's step has ``a`` leading. Returns the window
    decided for epoch 2 (from EndEpoch) and epoch 2's step factors."""
    client = RegulatorClient.in_process()
    job = f"edge-{profile}-{threshold!r}"
    client.open_session(job, ["a", "b"], profile, threshold=threshold, **params)
    window = []
    for epoch, fisher in enumerate(ref_traces):
        client.report(job, attempt=0, epoch=epoch, step=epoch, count=8,
                      score_sums={"a": 4.0, "b": 4.0}, fisher={"a": fisher, "b": fisher})
        window = list(client.end_epoch(job, attempt=0, epoch=epoch).next_window)
    resp = client.report(job, attempt=0, epoch=2, step=2, count=8,
                         score_sums={"a": 6.0, "b": 2.0}, fisher={"a": 1.0, "b": 1.0})
    factors = {m.modality: m.factors.proximal for m in resp.step.modalities}
    assert [(w.modality, w.open, w.growth) for w in resp.window] == [(w.modality, w.open, w.growth) for w in window]
    return window, factors


def official_k(traces: list[float], history: int) -> float:
    """docs/profiles.md: ``history`` zeros, then the reference trace per epoch; k from the means."""
    hist = [0.0] * history + traces
    tr1 = sum(hist[-history:]) / history
    tr2 = sum(hist[-history - 1 : -1]) / history
    return (tr1 - tr2) / tr1


def test_official_window_stays_closed_when_k_equals_the_threshold() -> None:
    traces = (30.0, 10.0)  # means 40/10 = 4.0 and 30/10 = 3.0: k = 1/4 exactly
    k = official_k(list(traces), 10)
    assert k == THRESHOLD
    window, factors = run_three_epochs("official", THRESHOLD, traces, reference_modality="a")
    assert [w.growth for w in window] == [THRESHOLD, THRESHOLD]  # the regulator's k, bit for bit
    assert [w.open for w in window] == [False, False]
    assert factors == {"a": 0.0, "b": 0.0}  # nothing is slowed at k == threshold
    # one ulp lower, the same k opens the window and the leader (a, the reference) is slowed
    window, factors = run_three_epochs("official", BELOW, traces, reference_modality="a")
    assert [w.open for w in window] == [True, True]
    assert factors["a"] > 0.0 and factors["b"] == 0.0


def test_paper_window_stays_closed_when_growth_equals_the_threshold() -> None:
    traces = (0.75, 1.0)  # (1.0 - 0.75) / 1.0 = 1/4 exactly
    growth = (traces[1] - traces[0]) / traces[1]
    assert growth == THRESHOLD
    window, factors = run_three_epochs("paper", THRESHOLD, traces)
    assert [w.growth for w in window] == [THRESHOLD, THRESHOLD]
    assert [w.open for w in window] == [False, False]
    assert factors == {"a": 0.0, "b": 0.0}
    window, factors = run_three_epochs("paper", BELOW, traces)
    assert [w.open for w in window] == [True, True]
    assert factors["a"] > 0.0 and factors["b"] == 0.0  # a leads; b has nothing below it
