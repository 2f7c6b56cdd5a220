"""The stored step record is spelled by hand on the hot path (one per answered step): it must be
byte for byte what ``json.dumps`` of the same dict writes, and read back exactly."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from regulator_service.model import Fallback, StepRecord
from regulator_service.storage import codec

floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 5e-324, 1e16, 1e22, 0.1])


def reference(r: StepRecord) -> str:
    return codec.dumps({
        "count": r.count, "score_sums": list(r.score_sums), "fishers": list(r.fishers), "proximal": list(r.proximal),
        "fallback": int(r.fallback), "digest": r.digest.hex(),
        **({"grad_scale": list(r.grad_scale)} if r.grad_scale else {}),
        **({"noise_scale": list(r.noise_scale)} if r.noise_scale else {}),
    })


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(1, 5), data=st.data(), count=st.integers(1, 2**53 - 1), fallback=st.sampled_from(list(Fallback)),
    digest=st.binary(min_size=16, max_size=16), scaled=st.booleans(), noisy=st.booleans(),
)
def test_step_json_is_what_json_dumps_writes_and_reads_back(n: int, data: st.DataObject, count: int, fallback: Fallback,
                                                           digest: bytes, scaled: bool, noisy: bool) -> None:
    vec = lambda: tuple(data.draw(st.lists(floats, min_size=n, max_size=n)))  # noqa: E731
    r = StepRecord(epoch=3, step=7, count=count, score_sums=vec(), fishers=vec(), proximal=vec(), fallback=fallback,
                   digest=digest, grad_scale=vec() if scaled else (), noise_scale=vec() if noisy else ())
    text = codec.step_to_json(r)
    assert text == reference(r)
    back = codec.step_from_json(3, 7, text)
    same = lambda a, b: all((x == y and math.copysign(1, x) == math.copysign(1, y)) or (x != x and y != y) for x, y in zip(a, b))  # noqa: E731
    assert back.count == count and back.fallback == fallback and back.digest == digest
    assert same(back.score_sums, r.score_sums) and same(back.fishers, r.fishers) and same(back.proximal, r.proximal)
    assert same(back.grad_scale, r.grad_scale) and same(back.noise_scale, r.noise_scale)
