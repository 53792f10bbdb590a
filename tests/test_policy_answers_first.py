"""The default policy, `answers_first`: every visual token while the budget pays, then E-AdaPrune."""

from __future__ import annotations

from dataclasses import replace

import pytest
from _factories import prepared

from joulecap.kernels import spectral_budget
from joulecap.policies import PlanContext, get_policy, policy_instance
from joulecap.policies.config import SchedulerConfig
from joulecap.runtime.errors import BasesNeeded, BudgetTooSmall
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.types import Plan, PreparedRequest

CFG = SchedulerConfig()
PRED = Predictor(1.0, 0.01, 0.1)  # 1 J fixed, 0.01 J per input token, 0.1 J per output token
MARGIN_REL = 0.15  # a feasibility margin as the learner may hold it
MARGIN = 1.0 + MARGIN_REL


def ctx(budget: float | None = None, max_tokens: int | None = None, **cfg: object) -> PlanContext:
    config = replace(CFG, **cfg)
    return PlanContext(
        config=config,
        predictor=PRED,
        tau=config.tau,
        max_tokens=max_tokens,
        budget_j=budget,
        margin=MARGIN_REL,
    )


def plan(p: PreparedRequest, c: PlanContext) -> Plan:
    return policy_instance("answers_first").plan(p, c)


def spectral(p: PreparedRequest, k_min: int = CFG.k_min) -> tuple[int, ...]:
    return tuple(int(spectral_budget(f, CFG.tau, k_min=k_min)) for f in p.features)


def test_is_the_default_and_may_prune_and_holds_budgets() -> None:
    assert CFG.policy == "answers_first"
    cls = get_policy("answers_first")
    assert cls.holds_budget and cls.prunes_visual


def test_without_a_budget_every_visual_token_and_the_usual_cap() -> None:
    p = prepared(visual=(64, 32))
    out = plan(p, ctx())
    assert out.visual_keep == (64, 32) and out.max_new_tokens == CFG.default_max_tokens
    assert plan(p, ctx(max_tokens=5)).max_new_tokens == 5
    # No minimum is stated without a budget: this encode skipped the decomposition that a
    # budgeted request's smallest plan needs.
    assert out.min_j is None


def test_only_a_budget_makes_it_prune() -> None:
    # Asked before the encode: without a budget the images are not decomposed (and go natively
    # on vLLM); with one, steps 2-4 may prune.
    policy = policy_instance("answers_first")
    assert policy.prunes(prepared().request) is False
    assert policy.prunes(prepared(energy_budget_j=2.0).request) is True
    assert policy_instance("joint").prunes(prepared().request) is True  # tau prunes without one
    assert policy_instance("output_budget").prunes(prepared(energy_budget_j=2.0).request) is False


def test_a_budget_that_pays_for_the_whole_answer_keeps_every_visual_token() -> None:
    p = prepared(visual=(64,))
    out = plan(p, ctx(budget=10.0, max_tokens=8))  # 1 + 0.84 + 0.8 J << 10 J
    assert out.visual_keep == (64,) and out.max_new_tokens == 8
    assert "whole answer" in out.reason


def test_a_binding_budget_shortens_the_answer_before_touching_visual_tokens() -> None:
    p = prepared(visual=(64,))
    out = plan(p, ctx(budget=3.0, max_tokens=64))
    assert out.visual_keep == (64,)
    assert 1 <= out.max_new_tokens < 64
    assert out.predicted_j <= 3.0 * (1 - CFG.budget_headroom) + 1e-9


def test_a_budget_with_every_visual_token_but_no_answer_prunes_toward_the_spectral_budget() -> None:
    p = prepared(visual=(64, 48), rank=6)
    spec = spectral(p)
    # Every visual token (112) and no output fit, one output token does not (with the margin);
    # the spectral budget's tokens with one output token do.
    budget = MARGIN * PRED.predict(20, 112, 1).total_j - 0.05
    assert PRED.predict(20, 112, 0).total_j < budget
    out = plan(p, ctx(budget=budget))
    assert sum(spec) <= sum(out.visual_keep) < 112
    assert all(s <= k <= n for s, k, n in zip(spec, out.visual_keep, (64, 48), strict=True))
    assert out.max_new_tokens >= 1
    assert MARGIN * PRED.predict(20, sum(out.visual_keep), 1).total_j <= budget + 1e-9


def test_below_the_spectral_budget_the_answer_is_kept_and_tokens_go_toward_the_floor() -> None:
    p = prepared(visual=(64, 48), rank=6)
    spec = spectral(p)
    floors = tuple(min(s, CFG.visual_floor_tokens) for s in spec)
    budget = MARGIN * PRED.predict(20, sum(spec), 1).total_j - 0.02  # spectral + 1 token: just not
    out = plan(p, ctx(budget=budget))
    assert sum(floors) <= sum(out.visual_keep) < sum(spec)
    assert out.max_new_tokens >= 1


def test_refuses_only_below_the_true_minimum_and_states_it() -> None:
    p = prepared(visual=(64, 48), rank=6)
    with pytest.raises(BudgetTooSmall) as err:
        plan(p, ctx(budget=1.0))
    min_j = err.value.min_j
    floors = sum(min(s, CFG.visual_floor_tokens) for s in spectral(p))
    assert min_j == pytest.approx(MARGIN * PRED.predict(20, floors, 1).total_j)
    # The stated minimum is enough: the same request with that budget gets an answer.
    out = plan(p, ctx(budget=min_j * 1.0001))
    assert out.max_new_tokens >= 1 and sum(out.visual_keep) >= floors


def test_an_answer_floor_buys_output_with_visual_tokens() -> None:
    p = prepared(visual=(64,), rank=6)
    budget = PRED.predict(20, 64, 8).total_j * MARGIN  # every token and 11 output tokens
    plain = plan(p, ctx(budget=budget, max_tokens=64))
    assert plain.visual_keep == (64,)
    floor = plan(p, ctx(budget=budget, max_tokens=64, answer_floor_tokens=12))
    assert floor.visual_keep[0] < 64 and floor.max_new_tokens >= 12
    # The client's own cap below the floor is the whole answer: nothing to prune for.
    short = plan(p, ctx(budget=budget, max_tokens=3, answer_floor_tokens=12))
    assert short.visual_keep == (64,) and short.max_new_tokens == 3


def test_config_rejects_a_zero_answer_floor() -> None:
    with pytest.raises(ValueError, match="answer_floor_tokens"):
        SchedulerConfig(answer_floor_tokens=0)


def test_prepared_without_its_decomposition_it_keeps_everything_or_asks_for_it() -> None:
    # `defers_bases`: with a budget the keep-all step is planned from token counts alone; the
    # same plan as with the decomposition, stating no minimum; a budget that binds asks for it.
    policy = policy_instance("answers_first")
    p = prepared(visual=(64, 32))
    request = p.request
    assert policy.defers_bases(replace(request, energy_budget_j=5.0))
    assert not policy.defers_bases(replace(request, energy_budget_j=None))
    pending = replace(p, bases_pending=True)
    ample = ctx(budget=1000.0, max_tokens=8)
    lazy, eager = plan(pending, ample), plan(p, ample)
    assert lazy.visual_keep == eager.visual_keep == (64, 32)
    assert lazy.max_new_tokens == eager.max_new_tokens == 8
    assert lazy.min_j is None and eager.min_j is not None
    tight = ctx(budget=eager.min_j, max_tokens=8)
    with pytest.raises(BasesNeeded):
        plan(pending, tight)
    assert sum(plan(p, tight).visual_keep) < 96  # with it, the same budget prunes
    with pytest.raises(BasesNeeded):  # and a refusal waits for it too: its minimum includes it
        plan(pending, ctx(budget=1e-6))
