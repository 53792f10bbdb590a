"""The robust overshoot estimates (feasibility margin, first-step premium), the learner that feeds
them, and their effect on planning."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from _factories import prepared

from joulecap.policies.config import SchedulerConfig
from joulecap.runtime.errors import BudgetTooSmall
from joulecap.runtime.learning import FIRST_STEP_PREMIUM_CAP, Learner, LearningConfig, Outcome
from joulecap.runtime.margin import LOWEST, MAD_TO_SIGMA, RobustOvershoot
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.scheduler import Scheduler
from joulecap.runtime.types import EnergyReport

# ------------------------------------------------------------------ RobustOvershoot


def test_floor_until_enough_runs_then_median_plus_z_robust_sigmas() -> None:
    m = RobustOvershoot(0.15, 0.9, z=2.33, min_samples=5)
    for over in (0.0, 0.1, 0.2, 0.3):
        m.observe(1.0, 1.0 + over)
    assert m.value() == 0.15  # too few runs to trust
    m.observe(1.0, 1.4)
    # Overshoots 0 .. 0.4: median 0.2, median absolute deviation 0.1.
    assert m.value() == pytest.approx(0.2 + 2.33 * MAD_TO_SIGMA * 0.1)
    assert m.stats() == {"value": m.value(), "samples": 5, "floor": 0.15, "cap": 0.9, "z": 2.33}


def test_the_floor_is_the_least_safety_above_the_median() -> None:
    # A steady error (no spread): the median plus the floor, whatever z says.
    steady = RobustOvershoot(0.1, 0.9, z=2.33, min_samples=1)
    for _ in range(10):
        steady.observe(1.0, 1.3)
    assert steady.value() == pytest.approx(0.3 + 0.1)
    # A prediction that runs high is corrected down: below the floor, even below zero.
    high = RobustOvershoot(0.1, 0.9, min_samples=1)
    for _ in range(10):
        high.observe(1.0, 0.7)
    assert high.value() == pytest.approx(-0.3 + 0.1)


def test_the_estimate_is_clamped_to_lowest_and_cap() -> None:
    hot = RobustOvershoot(0.1, 0.6, min_samples=1)
    for _ in range(10):
        hot.observe(1.0, 5.0)  # a meter glitch: 400% over, every time
    assert hot.value() == 0.6
    cool = RobustOvershoot(0.1, 0.6, min_samples=1)
    for _ in range(10):
        cool.observe(1.0, 0.1)  # ten times cheaper than predicted: corrected by at most half
    assert cool.value() == LOWEST == -0.5


def test_a_quantile_view_keeps_clear_of_a_long_right_tail() -> None:
    # 97 runs within +-5% and 3 at +60% (preemption): the robust value barely sees the three,
    # the 0.99 quantile view does, and the plain view is unchanged by the quantile's existence.
    m = RobustOvershoot(0.05, 1.0, z=3.0, window=50, min_samples=5, tail_window=200)
    tail = m.at(3.0, 0.99)
    assert tail.value() == m.value_at(3.0) == 0.05  # nothing seen yet: the floor
    overs = [0.05 * ((i * 37) % 21 - 10) / 10 for i in range(97)] + [0.6, 0.6, 0.6]
    for i, over in enumerate(overs):
        m.observe(1.0, 1.0 + over if i % 33 else 1.6)
    robust = m.value_at(3.0)
    assert robust < 0.2
    want = float(np.quantile([o if i % 33 else 0.6 for i, o in enumerate(overs)], 0.99))
    assert tail.value() == pytest.approx(min(1.0, want)) and tail.value() > robust + 0.3
    assert tail.stats()["quantile"] == 0.99 and tail.stats()["tail_samples"] == 100
    # A view made later reads the same window at once.
    assert m.at(3.0, 0.99).value() == tail.value()
    # The robust window (50) forgets the spikes before the tail window (200) does.
    for _ in range(60):
        m.observe(1.0, 1.0)
    assert m.value_at(3.0) == pytest.approx(0.05)
    assert tail.value() > 0.5
    with pytest.raises(ValueError, match="quantile"):
        m.at(3.0, 1.5)


def _noisy_window(m: RobustOvershoot, center: float, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for over in center + 0.02 * rng.standard_normal(n):
        m.observe(1.0, 1.0 + float(over))


def test_one_20x_spike_in_a_window_barely_moves_it() -> None:
    m = RobustOvershoot(0.0, 10.0, z=2.33, window=50)
    _noisy_window(m, 0.1, 49)
    before = m.value()
    assert 0.1 < before < 0.2
    m.observe(1.0, 20.0)  # one run measured at 20x its prediction (overshoot 19)
    assert m.stats()["samples"] == 50
    assert abs(m.value() - before) < 0.01
    # A high quantile of the same window would have jumped to the spike.
    assert m.value() < 0.2


def test_it_comes_back_down_when_the_error_falls() -> None:
    m = RobustOvershoot(0.05, 1.0, z=2.33, window=50)
    for _ in range(50):
        m.observe(1.0, 1.5)  # a loaded device: prefills run 50% over
    assert m.value() == pytest.approx(0.5 + 0.05)
    for _ in range(26):  # the load went away: most of the window is quiet again
        m.observe(1.0, 1.02)
    # Median 0.02; half the window sits on it, so the robust spread is 0: back to median + floor.
    assert m.value() == pytest.approx(0.02 + 0.05)
    _noisy_window(m, 0.02, 50, seed=2)  # a quiet window with its noise: the spread sets the safety
    assert 0.02 + 0.05 < m.value() < 0.02 + 2.33 * 0.03


BAD = [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.5), (1.0, 0.0), (float("nan"), 1.0), (1.0, float("inf"))]


@pytest.mark.parametrize("pred,meas", BAD)
def test_invalid_observations_are_ignored(pred: float, meas: float) -> None:
    m = RobustOvershoot(0.1, 0.5, min_samples=1)
    m.observe(pred, meas)
    assert m.stats()["samples"] == 0 and m.value() == 0.1


@pytest.mark.parametrize("floor,cap", [(-0.1, 0.5), (0.6, 0.5)])
def test_invalid_floor_and_cap(floor: float, cap: float) -> None:
    with pytest.raises(ValueError, match="floor"):
        RobustOvershoot(floor, cap)


@pytest.mark.parametrize(
    "field,value",
    [
        ("feasibility_margin", -0.1),
        ("feasibility_margin", 1.5),  # above the default ceiling 1.0
        ("feasibility_margin_max", 11.0),
        ("rls_forgetting", 0.0),
        ("speed_alpha", 1.01),
        ("feasibility_z", -1.0),
        ("feasibility_z", 6.0),
        ("cold_idle_s", 0.0),
    ],
)
def test_invalid_learning_config(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field.split("_max")[0]):
        LearningConfig(**{field: value})


# ------------------------------------------------------------------ Learner

PROMPT, VISUAL_IN, KEPT, OUT = 20, 64, 30, 10


def report(encode_j: float, prefill_j: float, decode_j: float, **kw: object) -> EnergyReport:
    fields: dict[str, object] = {"source": "measured", "meter": "test", "duration_s": 1.0, "idle_j": 0.0}
    fields.update(kw)
    return EnergyReport(
        total_j=encode_j + prefill_j + decode_j,
        prefill_j=prefill_j,
        decode_j=decode_j,
        encode_j=encode_j,
        **fields,
    )


def outcome(energy: EnergyReport, started_s: float | None = None, **kw: object) -> Outcome:
    fields: dict[str, object] = {
        "text_tokens": PROMPT,
        "visual_tokens_in": VISUAL_IN,
        "visual_tokens_kept": KEPT,
        "output_tokens": OUT,
        "first_step": None,
    }
    fields.update(kw)
    return Outcome(
        energy=energy,
        started_s=time.monotonic() if started_s is None else started_s,
        **fields,
    )


# Predicted run for (20 text, 30 kept, 10 out): prefill 1.5 J + 10 x 0.1 J = 2.5 J; the part that
# cannot be stopped (prefill + first token) is predicted at 1.6 J. The runs below measure the run
# exactly as predicted (the predictor does not move) but 2.0 J of it before the first decode step:
# an overshoot of 25%. The encode (0.4 J) is measured before planning and is no part of it.
DEAR_PREFILL = report(0.4, 2.0, 0.5)


def learner(**cfg: Any) -> Learner:
    """A learner with a 0.15 margin floor and z = 2.33 unless told otherwise."""
    settings: dict[str, Any] = {"feasibility_margin": 0.15, "feasibility_z": 2.33, **cfg}
    return Learner(Predictor(1.0, 0.01, 0.1), LearningConfig(**settings))


def test_the_learning_config_sets_the_margin() -> None:
    cfg = LearningConfig()
    lr = Learner(Predictor(1.0, 0.01, 0.1), cfg)
    assert lr.margin.stats() == {
        "value": cfg.feasibility_margin,
        "samples": 0,
        "floor": cfg.feasibility_margin,
        "cap": cfg.feasibility_margin_max,
        "z": cfg.feasibility_z,
    }
    assert lr.first_step.stats()["cap"] == FIRST_STEP_PREMIUM_CAP and lr.first_step.value() == 0.0
    assert lr.plan_margin.stats()["z"] == cfg.planning_z >= cfg.feasibility_z


def test_the_planning_margin_learns_the_same_errors_further_into_their_tail() -> None:
    lr = learner(planning_z=4.0)
    lr.mark_active()
    for i in range(40):
        # Prefill errors around +10% with a spread: both margins see the same runs.
        lr.observe(outcome(report(0.4, 1.6 * (1.05 + 0.1 * ((i * 7) % 11) / 10), 0.5)))
    assert lr.margin.stats()["samples"] == lr.plan_margin.stats()["samples"] > 0
    assert lr.plan_margin.value() > lr.margin.value()
    assert lr.stats()["plan_margin"]["z"] == 4.0


def test_planning_z_below_the_feasibility_z_is_rejected() -> None:
    with pytest.raises(ValueError, match="planning_z"):
        LearningConfig(feasibility_z=2.0, planning_z=1.5)
    with pytest.raises(ValueError, match="planning_quantile"):
        LearningConfig(planning_quantile=1.2)


def test_the_planning_margin_reads_its_quantile_and_zero_turns_it_off() -> None:
    on, off = learner(), learner(planning_quantile=0.0)
    for lr in (on, off):
        lr.mark_active()
        for i in range(60):
            # Prefill mostly as predicted (1.6 J), one run in ten 70% dearer.
            lr.observe(outcome(report(0.4, 1.6 * (1.7 if i % 10 == 0 else 1.0), 0.5)))
    assert on.plan_margin.stats()["quantile"] == LearningConfig().planning_quantile
    assert "quantile" not in off.plan_margin.stats()
    assert off.plan_margin.value() == pytest.approx(off.margin.value())  # no spread: median + floor
    assert on.plan_margin.value() > off.plan_margin.value() + 0.4


def test_a_cold_first_run_teaches_the_predictor_but_not_the_margins() -> None:
    lr = learner()
    lr.observe(outcome(DEAR_PREFILL, first_step=(0.1, 0.3)))
    assert lr.predictor.n_updates == 1
    stats: dict[str, Any] = lr.stats()
    assert stats["margin"] == {"value": 0.15, "samples": 0, "floor": 0.15, "cap": 1.0, "z": 2.33}
    assert (stats["first_step_premium"]["value"], stats["first_step_premium"]["samples"]) == (0.0, 0)
    assert lr.margin.value() == 0.15


def test_warm_runs_teach_the_margin_and_the_premium() -> None:
    lr = learner()
    lr.observe(outcome(DEAR_PREFILL))  # cold
    for _ in range(5):
        lr.observe(outcome(DEAR_PREFILL, first_step=(0.1, 0.15)))
    assert lr.predictor.n_updates == 6
    assert lr.predictor.predict(PROMPT, KEPT, OUT).total_j == pytest.approx(2.5)  # measured as predicted
    assert lr.margin.stats()["samples"] == 5
    assert lr.margin.value() == pytest.approx(0.25 + 0.15)  # 2.0 J over 1.6 J, plus the floor
    assert lr.first_step.value() == pytest.approx(0.5)  # 0.15 J measured over 0.1 J priced


def test_the_start_up_warm_up_makes_the_first_run_warm() -> None:
    lr = learner()
    lr.mark_active()
    lr.observe(outcome(DEAR_PREFILL))
    assert lr.margin.stats()["samples"] == 1


def test_a_run_after_a_long_idle_is_cold_again() -> None:
    lr = learner(cold_idle_s=60.0)
    lr.mark_active()
    lr.observe(outcome(DEAR_PREFILL, started_s=time.monotonic() + 61.0))
    assert lr.margin.stats()["samples"] == 0 and lr.predictor.n_updates == 1
    assert lr.is_warm(time.monotonic() + 59.0) and not lr.is_warm(time.monotonic() + 61.0)


@pytest.mark.parametrize("kw", [{"source": "replayed"}, {"interpolated": True}])
def test_replayed_or_interpolated_energy_teaches_nothing(kw: dict[str, object]) -> None:
    lr = learner()
    lr.mark_active()
    lr.observe(outcome(report(0.4, 2.2, 0.3, **kw), first_step=(0.1, 0.3)))
    assert lr.predictor.n_updates == 0
    assert lr.margin.stats()["samples"] == 0 and lr.first_step.stats()["samples"] == 0
    assert lr.is_warm(time.monotonic())  # it still counts as activity


def test_a_run_without_output_teaches_only_the_predictor() -> None:
    lr = learner()
    lr.mark_active()
    lr.observe(outcome(report(0.4, 1.5, 0.0), output_tokens=0))
    assert lr.predictor.n_updates == 1 and lr.margin.stats()["samples"] == 0


def test_the_encode_is_no_part_of_the_margin() -> None:
    # The encode is measured before planning and charged as spent: however dear it was, the margin
    # follows only the prefill's error (2.0 J over 1.6 J here).
    cheap, dear = learner(feasibility_margin=0.0), learner(feasibility_margin=0.0)
    for lr, encode_j in ((cheap, 0.1), (dear, 3.0)):
        lr.mark_active()
        for _ in range(5):
            lr.observe(outcome(report(encode_j, 2.0, 0.5)))
    assert cheap.margin.value() == dear.margin.value() == pytest.approx(0.25)


def test_the_first_step_premium_is_capped() -> None:
    lr = learner()
    lr.mark_active()
    for _ in range(5):
        lr.observe(outcome(DEAR_PREFILL, first_step=(0.1, 10.0)))
    assert lr.first_step.value() == FIRST_STEP_PREMIUM_CAP


# ------------------------------------------------------------------ effect on planning


@pytest.mark.parametrize("policy", ["joint", "output_budget"])
def test_a_noisy_prefill_raises_the_bar_for_tight_budgets(policy: str) -> None:
    pred = Predictor(1.0, 0.01, 0.1)
    lr = Learner(pred, LearningConfig(feasibility_margin=0.15))
    sched = Scheduler(replace(SchedulerConfig(), visual_floor_tokens=64), pred, lr)
    p = prepared(visual=(64,), energy_budget_j=None, policy=policy)
    kept = 64 if policy == "output_budget" else sum(sched.plan(p).visual_keep)
    cheapest = pred.predict(20, kept, 1).total_j
    tight = prepared(visual=(64,), energy_budget_j=cheapest * 1.2, policy=policy)
    out = sched.plan(tight)  # 20% over the cheapest run: past the 15% floor
    assert out.margin == 0.15 and out.min_j == pytest.approx(1.15 * cheapest, abs=1e-6)
    for _ in range(40):  # the device's prefills run 50% over their prediction
        lr.margin.observe(1.0, 1.5)
    with pytest.raises(BudgetTooSmall) as err:
        sched.plan(tight)
    assert err.value.min_j == pytest.approx((1 + 0.5 + 0.15) * cheapest, abs=1e-6)
    assert "margin 0.650" in err.value.message
