"""Splitting a batched window's energy among requests by token work."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from joulecap.runtime.energy.attribution import TokenWork, split_by_token_work


def test_proportional_to_weighted_token_work() -> None:
    work = {
        "a": TokenWork(prefill_tokens=100, decode_tokens=0),
        "b": TokenWork(prefill_tokens=0, decode_tokens=10),
        "c": TokenWork(prefill_tokens=0, decode_tokens=30),
    }
    # One decode token costs 20x a prefill token: weights 100, 200, 600.
    shares = split_by_token_work(90.0, work, prefill_cost=0.01, decode_cost=0.2)
    assert list(shares) == ["a", "b", "c"]
    assert shares["a"] == pytest.approx(10.0)
    assert shares["b"] == pytest.approx(20.0)
    assert shares["c"] == pytest.approx(60.0)
    assert sum(shares.values()) == 90.0


def test_sum_is_exact_for_awkward_values() -> None:
    work = {str(i): TokenWork(prefill_tokens=i % 7, decode_tokens=1 + i % 3) for i in range(33)}
    window = 0.1 + 0.2  # 0.30000000000000004
    shares = split_by_token_work(window, work, prefill_cost=1 / 3, decode_cost=math.pi)
    assert sum(shares.values()) == window
    assert math.fsum(shares.values()) == window
    assert sum(reversed(list(shares.values()))) == window


def test_edge_cases() -> None:
    assert split_by_token_work(0.0, {}, prefill_cost=1, decode_cost=1) == {}
    assert split_by_token_work(0.0, {"a": TokenWork(1, 1)}, prefill_cost=1, decode_cost=1) == {"a": 0.0}
    even = split_by_token_work(
        3.0, {"a": TokenWork(), "b": TokenWork(), "c": TokenWork()}, prefill_cost=1, decode_cost=1
    )
    assert even == {"a": 1.0, "b": 1.0, "c": 1.0}
    with pytest.raises(ValueError):
        split_by_token_work(1.0, {}, prefill_cost=1, decode_cost=1)
    with pytest.raises(ValueError):
        split_by_token_work(-1.0, {"a": TokenWork(1, 0)}, prefill_cost=1, decode_cost=1)
    with pytest.raises(ValueError):
        split_by_token_work(1.0, {"a": TokenWork(-1, 0)}, prefill_cost=1, decode_cost=1)
    with pytest.raises(ValueError):
        split_by_token_work(1.0, {"a": TokenWork(1, 0)}, prefill_cost=math.nan, decode_cost=1)


works = st.dictionaries(
    st.text(min_size=1, max_size=6),
    st.builds(TokenWork, st.integers(0, 5000), st.integers(0, 500)),
    min_size=1,
    max_size=40,
)
energies = st.floats(min_value=0.0, max_value=1e7, allow_nan=False, allow_infinity=False)
costs = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(window=energies, work=works, prefill_cost=costs, decode_cost=costs)
def test_shares_sum_exactly_and_are_proportional(
    window: float, work: dict[str, TokenWork], prefill_cost: float, decode_cost: float
) -> None:
    shares = split_by_token_work(window, work, prefill_cost=prefill_cost, decode_cost=decode_cost)
    assert list(shares) == list(work)
    values = list(shares.values())
    assert sum(values) == window
    assert math.fsum(values) == window
    assert all(v >= 0 for v in values)
    weights = [w.prefill_tokens * prefill_cost + w.decode_tokens * decode_cost for w in work.values()]
    total = math.fsum(weights)
    if window > 0 and total > 0:
        for v, w in zip(values, weights, strict=True):
            # Off by at most a few units in the last place of the window.
            assert abs(v - window * (w / total)) <= 4 * math.ulp(window) + 1e-12 * window
