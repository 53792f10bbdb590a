"""Governor: stops before the budget; trusts the larger of measured and predicted spend unless the
measurement is current. It reads everything it needs from the plan (`holds_budget`, `encode_j`,
`predicted_prefill_j`) and the predicted cost of one token."""

from __future__ import annotations

import pytest

from joulecap.runtime.governor import Governor
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.types import Plan

PRED = Predictor(1.0, 0.01, 0.1)
TOKEN_J = PRED.decode_j_per_token()  # 0.1 J per generated token
PREFILL_J = PRED.predict(20, 30, 0).prefill_j  # 1.0 J fixed + 50 prompt tokens x 0.01 J = 1.5 J


def make_plan(
    budget: float | None, *, holds: bool = True, encode_j: float = 0.0, n: int = 100, policy: str = "joint"
) -> Plan:
    run = PRED.predict(20, 30, n)
    return Plan(
        (30,),
        n,
        encode_j + run.total_j,
        policy,
        "test",
        budget_j=budget,
        holds_budget=holds,
        encode_j=encode_j,
        predicted_prefill_j=run.prefill_j,
    )


def test_the_prices_the_tests_assume() -> None:
    assert pytest.approx(0.1) == TOKEN_J and pytest.approx(1.5) == PREFILL_J


def test_no_budget_never_stops() -> None:
    g = Governor(make_plan(None), TOKEN_J, lambda: 1e9)
    assert not any(g.should_stop(n) for n in range(1000))
    assert g.stopped_at is None


def test_stops_on_prediction_when_meter_lags() -> None:
    budget = 3.0  # prefill 1.5 J, 0.1 J per token -> 15 tokens fit
    g = Governor(make_plan(budget), TOKEN_J, lambda: 0.0)
    stops = [n for n in range(100) if g.should_stop(n)]
    assert stops[0] == 15 and g.stopped_at == stops[-1]
    # The spend it stopped on is the plan's prediction, the meter having read nothing.
    g15 = Governor(make_plan(budget), TOKEN_J, lambda: 0.0)
    assert [g15.should_stop(n) for n in (14, 15)] == [False, True]
    assert g15.last_spent_j == pytest.approx(1.5 + 15 * 0.1)


def test_the_prefill_comes_from_the_plan_not_from_its_total() -> None:
    # Same budget and total, but the plan says the prefill is dearer: fewer tokens fit.
    plan = make_plan(3.0)
    dear = Plan(
        plan.visual_keep,
        plan.max_new_tokens,
        plan.predicted_j,
        plan.policy,
        plan.reason,
        budget_j=3.0,
        predicted_prefill_j=2.0,
    )
    g = Governor(dear, TOKEN_J, lambda: 0.0)
    assert next(n for n in range(100) if g.should_stop(n)) == 10  # 2.0 + 10 x 0.1 + 0.1 > 3.0


def test_the_measured_encode_is_part_of_the_spend() -> None:
    # 1 J of encode already spent: 1 + 1.5 + 0.1 n + 0.1 > 3.5 first at n = 10 (at 9 it fits exactly).
    g = Governor(make_plan(3.5, encode_j=1.0), TOKEN_J, lambda: 0.0)
    assert next(n for n in range(100) if g.should_stop(n)) == 10
    assert g.last_spent_j == pytest.approx(1.0 + 1.5 + 1.0)
    # Without the encode, the same budget leaves 10 more tokens.
    free = Governor(make_plan(3.5), TOKEN_J, lambda: 0.0)
    assert next(n for n in range(100) if free.should_stop(n)) == 20


def test_stops_on_measurement_when_it_runs_ahead() -> None:
    measured = {"j": 0.0}
    g = Governor(make_plan(3.0), TOKEN_J, lambda: measured["j"])
    assert not g.should_stop(2)
    measured["j"] = 2.95  # the device is costlier than predicted
    assert g.should_stop(3)
    assert g.stopped_at == 3 and g.last_spent_j == pytest.approx(2.95)


def test_a_current_measurement_lets_a_cheap_run_use_what_it_saved() -> None:
    # Predicted: 1.5 J prefill + 0.1 J per token, 15 tokens fit 3 J. The run really costs 1.0 J
    # of prefill and 0.1 J per token: 20 tokens fit.
    def run(current: bool) -> int:
        clock = {"n": 0}
        g = Governor(make_plan(3.0), TOKEN_J, lambda: 1.0 + 0.1 * clock["n"], measurement_is_current=current)
        for n in range(100):
            clock["n"] = n
            if g.should_stop(n):
                return n
        raise AssertionError("never stopped")

    assert run(False) == 15  # a lagging meter: the larger prediction stands for the spend
    assert run(True) == 20


def test_a_current_measurement_still_stops_a_dear_run() -> None:
    measured = {"j": 0.0}
    g = Governor(make_plan(3.0), TOKEN_J, lambda: measured["j"], measurement_is_current=True)
    assert not g.should_stop(2)
    measured["j"] = 2.95
    assert g.should_stop(3) and g.last_spent_j == pytest.approx(2.95)


@pytest.mark.parametrize("policy", ["baseline", "joint", "custom-tool"])
def test_the_plan_says_whether_its_budget_is_held(policy: str) -> None:
    # The policy's name plays no part: a plan that does not hold its budget only records it.
    loose = Governor(make_plan(0.1, holds=False, policy=policy), TOKEN_J, lambda: 100.0)
    assert not any(loose.should_stop(n) for n in range(50))
    assert loose.budget_j is None and loose.stopped_at is None
    held = Governor(make_plan(0.1, holds=True, policy=policy), TOKEN_J, lambda: 100.0)
    assert held.should_stop(0) and held.stopped_at == 0


def test_dear_measured_tokens_raise_the_next_token_estimate() -> None:
    # Prediction: 1.5 J prefill + 0.1 J per token. The device is busy: each token costs 0.5 J.
    budget = 5.0
    clock = {"n": 0}
    g = Governor(make_plan(budget), TOKEN_J, lambda: 1.5 + 0.5 * clock["n"])
    stopped = None
    for n in range(1, 100):
        clock["n"] = n
        if g.should_stop(n):
            stopped = n
            break
    # At 6 tokens 4.5 J + 0.5 J fits 5 J exactly; at 7 (5.0 J spent) the next dear token does not.
    assert stopped == 7 and g.last_spent_j == pytest.approx(5.0)
    assert g.next_token_j() == pytest.approx(0.5)


def test_a_run_dearer_than_predicted_makes_the_next_token_dearer() -> None:
    # Prefill predicted at 1.5 J (after 0.5 J of measured encode) but measured at twice that: the
    # device is slower than the predictor knows, so the first decode step is priced at 2x too.
    spent = 0.5
    plan = make_plan(3.85, encode_j=spent)
    measured = {"j": spent + 2 * (1.5 + 0.1)}  # encode + (prefill and first token) x 2
    g = Governor(plan, TOKEN_J, lambda: measured["j"])
    assert g.should_stop(1)  # 3.7 J spent + 0.2 J > 3.85 J; with the plain 0.1 J it would go on
    assert g.slowdown == pytest.approx(2.0) and g.next_token_j() == pytest.approx(0.2)
    # A run cheaper than predicted never lowers the price below the prediction.
    cheap = Governor(plan, TOKEN_J, lambda: spent + 0.5)
    assert not cheap.should_stop(1)
    assert cheap.slowdown == 1.0 and cheap.next_token_j() == pytest.approx(0.1)


def test_the_first_decode_step_carries_the_premium_and_is_measured() -> None:
    # Prefill measured as predicted (1.6 J with the first token); the next-token estimate is 0.1 J.
    measured = {"j": 1.6}
    plan = make_plan(1.75)
    plain = Governor(plan, TOKEN_J, lambda: measured["j"])
    assert not plain.should_stop(1)  # 1.6 + 0.1 fits 1.75
    dear = Governor(plan, TOKEN_J, lambda: measured["j"], first_step_premium=1.0)
    assert dear.should_stop(1)  # 1.6 + 0.1 x 2 does not
    assert dear.first_step_priced_j == pytest.approx(0.1)

    g = Governor(make_plan(10.0), TOKEN_J, lambda: measured["j"], first_step_premium=1.0)
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
    unpriced = Governor(make_plan(None), TOKEN_J, lambda: measured["j"])
    assert not unpriced.should_stop(1) and unpriced.first_step_observation(2, 0.3) is None


def test_a_negative_premium_is_no_discount() -> None:
    g = Governor(make_plan(10.0), TOKEN_J, lambda: 1.6, first_step_premium=-0.5)
    assert not g.should_stop(1) and g.next_token_j() == pytest.approx(0.1)
