"""Governor: stops before the budget; trusts the larger of measured and predicted spend unless the
measurement is current."""

from __future__ import annotations

import pytest

from joulecap.runtime.governor import Governor
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.types import Plan

PRED = Predictor(1.0, 0.01, 0.1)


def make_plan(budget: float | None, policy: str = "joint", n: int = 100) -> Plan:
    predicted = PRED.predict(20, 30, n).total_j
    return Plan((30,), n, predicted, policy, "test", budget_j=budget)


def test_no_budget_never_stops() -> None:
    g = Governor(make_plan(None), PRED, lambda: 1e9)
    assert not any(g.should_stop(n) for n in range(1000))


def test_stops_on_prediction_when_meter_lags() -> None:
    budget = 3.0  # prefill 1.5 J, 0.1 J per token -> 15 tokens fit
    g = Governor(make_plan(budget), PRED, lambda: 0.0)
    stops = [n for n in range(100) if g.should_stop(n)]
    assert stops[0] == 15
    assert g.prefill_j + 15 * g.token_j <= budget + 1e-9


def test_stops_on_measurement_when_it_runs_ahead() -> None:
    measured = {"j": 0.0}
    g = Governor(make_plan(3.0), PRED, lambda: measured["j"])
    assert not g.should_stop(2)
    measured["j"] = 2.95  # the device is costlier than predicted
    assert g.should_stop(3)
    assert g.stopped_at == 3 and g.last_spent_j == pytest.approx(2.95)


def test_a_current_measurement_lets_a_cheap_run_use_what_it_saved() -> None:
    # Predicted: 1.5 J prefill + 0.1 J per token, 15 tokens fit 3 J. The run really costs 1.0 J
    # of prefill and 0.1 J per token: 20 tokens fit.
    def run(current: bool) -> int:
        clock = {"n": 0}
        g = Governor(make_plan(3.0), PRED, lambda: 1.0 + 0.1 * clock["n"], measurement_is_current=current)
        for n in range(100):
            clock["n"] = n
            if g.should_stop(n):
                return n
        raise AssertionError("never stopped")

    assert run(False) == 15  # a lagging meter: the larger prediction stands for the spend
    assert run(True) == 20


def test_a_current_measurement_still_stops_a_dear_run() -> None:
    measured = {"j": 0.0}
    g = Governor(make_plan(3.0), PRED, lambda: measured["j"], measurement_is_current=True)
    assert not g.should_stop(2)
    measured["j"] = 2.95
    assert g.should_stop(3) and g.last_spent_j == pytest.approx(2.95)


def test_baseline_plans_record_but_do_not_hold_the_budget() -> None:
    g = Governor(make_plan(0.1, policy="baseline"), PRED, lambda: 100.0)
    assert not g.should_stop(50)
    g2 = Governor(make_plan(0.1, policy="output_budget"), PRED, lambda: 100.0)
    assert g2.should_stop(0)


def test_plans_from_unknown_policies_hold_their_budget() -> None:
    g = Governor(make_plan(1.0, policy="custom-tool"), PRED, lambda: 5.0)
    assert g.should_stop(0)


def test_dear_measured_tokens_raise_the_next_token_estimate() -> None:
    # Prediction: 1.5 J prefill + 0.1 J per token. The device is busy: each token costs 0.5 J.
    budget = 5.0
    clock = {"n": 0}
    g = Governor(make_plan(budget), PRED, lambda: 1.5 + 0.5 * clock["n"])
    stopped = None
    for n in range(1, 100):
        clock["n"] = n
        if g.should_stop(n):
            stopped = n
            break
    assert stopped is not None
    assert g.next_token_j() == pytest.approx(0.5)
    # It stops while the next (dear) token still fits: spent + 0.5 <= budget after stopping.
    assert 1.5 + 0.5 * stopped <= budget
    assert 1.5 + 0.5 * (stopped + 1) > budget


def test_a_run_dearer_than_predicted_makes_the_next_token_dearer() -> None:
    # Prefill predicted at 1.5 J (after 0.5 J of measured encode) but measured at twice that: the
    # device is slower than the predictor knows, so the first decode step is priced at 2x too.
    spent = 0.5
    plan = Plan((30,), 100, spent + PRED.predict(20, 30, 100).total_j, "joint", "test", budget_j=3.85)
    measured = {"j": spent + 2 * (1.5 + 0.1)}  # encode + (prefill and first token) x 2
    g = Governor(plan, PRED, lambda: measured["j"], spent_j=spent)
    assert g.should_stop(1)  # 3.7 J spent + 0.2 J > 3.85 J; with the plain 0.1 J it would go on
    assert g.slowdown == pytest.approx(2.0) and g.next_token_j() == pytest.approx(0.2)
    # A run cheaper than predicted never lowers the price below the prediction.
    cheap = Governor(plan, PRED, lambda: spent + 0.5, spent_j=spent)
    assert not cheap.should_stop(1)
    assert cheap.slowdown == 1.0 and cheap.next_token_j() == pytest.approx(0.1)


def test_the_first_decode_step_carries_the_premium_and_is_measured() -> None:
    # Prefill measured as predicted (1.6 J with the first token); the next-token estimate is 0.1 J.
    measured = {"j": 1.6}
    plan = make_plan(1.75)
    plain = Governor(plan, PRED, lambda: measured["j"])
    assert not plain.should_stop(1)  # 1.6 + 0.1 fits 1.75
    dear = Governor(plan, PRED, lambda: measured["j"], first_step_premium=1.0)
    assert dear.should_stop(1)  # 1.6 + 0.1 x 2 does not
    assert dear.first_step_priced_j == pytest.approx(0.1)

    g = Governor(make_plan(10.0), PRED, lambda: measured["j"], first_step_premium=1.0)
    assert not g.should_stop(1) and g.next_token_j() == pytest.approx(0.2)
    measured["j"] = 1.6 + 0.25  # the first decode step cost 0.25 J
    assert not g.should_stop(2)
    assert g.first_step_j == pytest.approx(0.25) and g.first_step_priced_j == pytest.approx(0.1)
    # From the second step on, the measured steps price the next token, not the premium.
    assert g.next_token_j() == pytest.approx(0.25)
    assert g.first_step_observation(tokens=9, decode_j=2.0) == pytest.approx((0.1, 0.25))
    # A run the second token ended was never checked at 2: its decode phase is that step (+ tail).
    assert dear.first_step_observation(tokens=2, decode_j=0.3) == pytest.approx((0.1, 0.3))
    assert dear.first_step_observation(tokens=1, decode_j=0.0) is None  # stopped before that step
    unpriced = Governor(make_plan(None), PRED, lambda: measured["j"])
    assert not unpriced.should_stop(1) and unpriced.first_step_observation(2, 0.3) is None
