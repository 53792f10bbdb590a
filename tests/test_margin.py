"""Feasibility margin learned from the measured prefill's overshoot, and its effect on planning."""

from __future__ import annotations

from dataclasses import replace

import pytest
from _factories import prepared

from joulecap.policies.config import SchedulerConfig
from joulecap.runtime.errors import BudgetTooSmall
from joulecap.runtime.margin import FeasibilityMargin
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.scheduler import Scheduler


def test_floor_until_enough_runs_then_the_quantile() -> None:
    m = FeasibilityMargin(0.15, 0.9, window=100, min_samples=10)
    for _ in range(9):
        m.observe(1.0, 2.0)  # 100% over
    assert m.value() == 0.15  # too few runs to trust
    m.observe(1.0, 2.0)
    assert m.value() == pytest.approx(1.0)
    # A quiet device: the quantile falls under the floor, which then holds.
    quiet = FeasibilityMargin(0.15, 0.9, min_samples=10)
    for i in range(50):
        quiet.observe(1.0, 1.0 + 0.001 * i)
    assert quiet.value() == 0.15


def test_quantile_of_the_recent_window() -> None:
    m = FeasibilityMargin(0.0, 0.99, window=100, min_samples=1)
    for i in range(100):
        m.observe(1.0, 1.0 + i / 100)  # overshoots 0.00 .. 0.99
    assert m.value() == pytest.approx(0.98, abs=0.01)
    for _ in range(100):  # load went away: the old overshoots leave the window
        m.observe(1.0, 1.0)
    assert m.value() == 0.0
    assert m.stats()["samples"] == 100


BAD = [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.5), (float("nan"), 1.0), (1.0, float("inf"))]


@pytest.mark.parametrize("pred,meas", BAD)
def test_invalid_observations_are_ignored(pred: float, meas: float) -> None:
    m = FeasibilityMargin(0.1, 0.5, min_samples=1)
    m.observe(pred, meas)
    assert m.stats()["samples"] == 0 and m.value() == 0.1


def test_invalid_quantile() -> None:
    with pytest.raises(ValueError):
        FeasibilityMargin(0.1, 0.0)
    with pytest.raises(ValueError):
        SchedulerConfig(feasibility_quantile=1.5)


@pytest.mark.parametrize("policy", ["joint", "output_budget"])
def test_a_noisy_prefill_raises_the_bar_for_tight_budgets(policy: str) -> None:
    pred = Predictor(1.0, 0.01, 0.1)
    sched = Scheduler(replace(SchedulerConfig(), visual_floor_tokens=64), pred)
    p = prepared(visual=(64,), energy_budget_j=None, policy=policy)
    kept = 64 if policy == "output_budget" else sum(sched.plan(p).visual_keep)
    cheapest = pred.predict(20, kept, 1).total_j
    tight = prepared(visual=(64,), energy_budget_j=cheapest * 1.2, policy=policy)
    assert sched.plan(tight).max_new_tokens >= 1  # 20% over the cheapest run: past the 15% floor
    for _ in range(40):  # the device's prefills run 50% over their prediction
        sched.margin.observe(1.0, 1.5)
    with pytest.raises(BudgetTooSmall) as err:
        sched.plan(tight)
    assert err.value.min_j == pytest.approx(1.5 * cheapest, rel=0.02)
