"""Policies: each one's plan on hand-made prepared requests (random low-rank visual features)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from _factories import prepared

from joulecap.kernels import spectral_budget
from joulecap.policies import PlanContext, Policy, available_policies, get_policy, policy_instance, register
from joulecap.policies.config import SchedulerConfig
from joulecap.runtime.errors import BudgetTooSmall, InvalidRequest
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.types import Plan, PreparedRequest

CFG = SchedulerConfig()
PRED = Predictor(1.0, 0.01, 0.1)  # 1 J fixed, 0.01 J per input token, 0.1 J per output token


def ctx(
    budget: float | None = None, max_tokens: int | None = None, spent: float = 0.0, **cfg: object
) -> PlanContext:
    config = replace(CFG, **cfg)
    return PlanContext(
        config=config, predictor=PRED, tau=config.tau, max_tokens=max_tokens, budget_j=budget, spent_j=spent
    )


def plan(name: str, p: PreparedRequest, c: PlanContext) -> Plan:
    return policy_instance(name).plan(p, c)


def test_registry_lists_all_policies_and_rejects_unknown() -> None:
    assert set(available_policies()) >= {
        "baseline",
        "fixed_output",
        "fixed_prune",
        "eadaprune",
        "output_budget",
        "joint",
    }
    with pytest.raises(InvalidRequest) as err:
        get_policy("nope")
    assert "joint" in err.value.message and "baseline" in err.value.message
    assert err.value.http_status == 400
    for name in available_policies():
        assert get_policy(name).__doc__


def test_register_refuses_a_second_class_under_the_same_name() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register("joint")
        class Other(Policy):
            def plan(self, prepared: PreparedRequest, ctx: PlanContext) -> Plan:
                raise NotImplementedError


def test_baseline_keeps_everything_and_ignores_budget() -> None:
    p = prepared(visual=(64, 32))
    out = plan("baseline", p, ctx(budget=0.5))
    assert out.visual_keep == (64, 32)
    assert out.max_new_tokens == CFG.default_max_tokens
    assert out.budget_j == 0.5 and out.policy == "baseline"
    assert out.predicted_j == pytest.approx(PRED.predict(20, 96, CFG.default_max_tokens).total_j)
    assert get_policy("baseline").holds_budget is False


def test_client_max_tokens_and_context_limit_the_output() -> None:
    p = prepared(visual=(64,), context_length=100)
    assert plan("baseline", p, ctx(max_tokens=5)).max_new_tokens == 5
    assert plan("baseline", p, ctx()).max_new_tokens == 100 - 20 - 64
    full = prepared(visual=(64,), text_tokens=36, context_length=100)
    with pytest.raises(InvalidRequest, match="context"):
        plan("baseline", full, ctx())


def test_fixed_output_and_fixed_prune() -> None:
    p = prepared(visual=(64, 5, 0))
    assert plan("fixed_output", p, ctx(fixed_output_tokens=7)).max_new_tokens == 7
    assert plan("fixed_output", p, ctx(fixed_output_tokens=7, max_tokens=3)).max_new_tokens == 3
    out = plan("fixed_prune", p, ctx(fixed_prune_ratio=0.25))
    assert out.visual_keep == (16, 2, 0)


def test_eadaprune_uses_the_spectral_budget_per_image() -> None:
    p = prepared(visual=(64, 48), rank=6)
    out = plan("eadaprune", p, ctx(k_min=2))
    want = tuple(int(spectral_budget(f, CFG.tau, k_min=2)) for f in p.features)
    assert out.visual_keep == want
    assert all(k <= 8 for k in out.visual_keep)  # low rank -> few tokens
    hi = plan("eadaprune", p, replace(ctx(k_min=2), tau=1.0))
    assert sum(hi.visual_keep) >= sum(out.visual_keep)


def test_spectral_budget_reads_the_basis_prepare_made(monkeypatch: pytest.MonkeyPatch) -> None:
    # Engines compute each image's exact basis in prepare (measured with the encode); the budget
    # is then read off its energies: the same keep, and no second decomposition while planning.
    from joulecap.kernels import dispatch, leverage_basis

    p = prepared(visual=(64, 48), rank=6)
    want = plan("eadaprune", p, ctx(k_min=2)).visual_keep
    with_bases = replace(p, bases=tuple(leverage_basis(f) for f in p.features))

    def no_decomposition(*_args: object, **_kw: object) -> object:
        raise AssertionError("planning decomposed the features again")

    monkeypatch.setattr(dispatch, "exact_budget", no_decomposition)
    assert plan("eadaprune", with_bases, ctx(k_min=2)).visual_keep == want
    assert plan("joint", with_bases, ctx(budget=50.0, k_min=2)).visual_keep == want
    with pytest.raises(AssertionError, match="decomposed"):
        plan("eadaprune", p, ctx(k_min=2))


@pytest.mark.parametrize("budget", [3.0, 5.0, 10.0, 20.0])
def test_output_budget_fits_the_budget_with_headroom(budget: float) -> None:
    p = prepared(visual=(64,))
    out = plan("output_budget", p, ctx(budget=budget))
    assert out.visual_keep == (64,)
    assert out.predicted_j <= budget * (1 - CFG.budget_headroom) + 1e-9
    # one more token would not fit the spendable part
    assert PRED.predict(20, 64, out.max_new_tokens + 1).total_j > budget * (1 - CFG.budget_headroom)


def test_output_budget_refuses_with_min_joules() -> None:
    p = prepared(visual=(64,))
    with pytest.raises(BudgetTooSmall) as err:
        plan("output_budget", p, ctx(budget=1.5))
    min_j = (1 + CFG.feasibility_margin) * PRED.predict(20, 64, 1).total_j
    assert err.value.min_j == pytest.approx(min_j)
    assert f"needs at least {min_j:.4g} J" in err.value.message
    assert err.value.http_status == 422


def test_budget_within_the_feasibility_margin_is_refused() -> None:
    # The prefill cannot be stopped: a budget that only the point prediction fits is refused.
    p = prepared(visual=(64,))
    spectral = sum(plan("eadaprune", p, ctx()).visual_keep)
    for name, visual in (("output_budget", 64), ("joint", spectral)):
        exact = PRED.predict(20, visual, 1).total_j  # the cheapest answer (joint: floor = spectral)
        with pytest.raises(BudgetTooSmall):
            plan(name, p, ctx(budget=exact * (1 + CFG.feasibility_margin / 2), visual_floor_tokens=64))
        budget = exact * (1 + CFG.feasibility_margin) * (1 + 1e-9)
        ok = plan(name, p, ctx(budget=budget, visual_floor_tokens=64))
        assert ok.max_new_tokens >= 1 and ok.predicted_j <= budget


def test_headroom_never_makes_a_feasible_budget_infeasible() -> None:
    p = prepared(visual=(64,))
    exact = PRED.predict(20, 64, 1).total_j * (1 + CFG.feasibility_margin)  # the stated minimum
    out = plan("output_budget", p, ctx(budget=exact * (1 + 1e-9), budget_headroom=0.5))
    assert out.max_new_tokens == 1


def test_joint_prunes_first_then_spends_the_rest_on_output() -> None:
    p = prepared(visual=(64, 64), rank=4)
    budget = 6.0
    out = plan("joint", p, ctx(budget=budget))
    spectral = plan("eadaprune", p, ctx())
    assert out.visual_keep == spectral.visual_keep
    ob = plan("output_budget", p, ctx(budget=budget))
    assert out.max_new_tokens > ob.max_new_tokens  # pruning freed joules for the answer
    assert out.predicted_j <= budget * (1 - CFG.budget_headroom) + 1e-9
    assert get_policy("joint").holds_budget is True


def test_joint_lowers_visual_tokens_toward_the_floor_when_tight() -> None:
    p = prepared(visual=(200, 100), rank=64)
    spectral = plan("eadaprune", p, ctx()).visual_keep
    tight = PRED.predict(20, 40, 1).total_j  # room for ~40 visual tokens and one output token
    out = plan("joint", p, ctx(budget=tight, visual_floor_tokens=4))
    assert sum(out.visual_keep) < sum(spectral)
    assert all(k >= 4 for k in out.visual_keep)
    assert out.max_new_tokens >= 1
    assert out.predicted_j <= tight + 1e-9
    assert "lowered" in out.reason


def test_joint_422_states_the_minimum_at_the_floor() -> None:
    p = prepared(visual=(200, 100), rank=64)
    with pytest.raises(BudgetTooSmall) as err:
        plan("joint", p, ctx(budget=1.0, visual_floor_tokens=4))
    min_j = (1 + CFG.feasibility_margin) * PRED.predict(20, 8, 1).total_j
    assert err.value.min_j == pytest.approx(min_j)
    assert f"needs at least {min_j:.4g} J" in err.value.message
    # and the minimum it states is indeed accepted
    ok = plan("joint", p, ctx(budget=err.value.min_j * (1 + 1e-9), visual_floor_tokens=4))
    assert sum(ok.visual_keep) >= 8 and ok.max_new_tokens >= 1 and ok.predicted_j <= ok.budget_j


@pytest.mark.parametrize("name", ["output_budget", "joint"])
def test_energy_already_spent_on_encoding_is_taken_off_the_budget(name: str) -> None:
    # The measured encode is spent before planning: the plan's run must fit what is left.
    p = prepared(visual=(64,))
    budget, spent = 6.0, 2.5
    fresh = plan(name, p, ctx(budget=budget))
    after = plan(name, p, ctx(budget=budget, spent=spent))
    assert after.max_new_tokens < fresh.max_new_tokens
    run_j = PRED.predict(20, sum(after.visual_keep), after.max_new_tokens).total_j
    assert after.predicted_j == pytest.approx(spent + run_j)  # the plan's figure is the whole request
    assert run_j <= budget - spent - budget * CFG.budget_headroom + 1e-9
    # one more token would not fit what is left
    assert PRED.predict(20, sum(after.visual_keep), after.max_new_tokens + 1).total_j > (
        budget - spent - budget * CFG.budget_headroom
    )


@pytest.mark.parametrize("name", ["output_budget", "joint"])
def test_422_when_the_encode_alone_spent_the_budget(name: str) -> None:
    p = prepared(visual=(64,))
    with pytest.raises(BudgetTooSmall) as err:
        plan(name, p, ctx(budget=2.0, spent=2.5))
    # what was spent plus the cheapest run, both with the margin (a retry encodes again); joint's
    # cheapest run keeps only the visual floor
    cheapest_visual = 64 if name == "output_budget" else CFG.visual_floor_tokens
    margin = 1 + CFG.feasibility_margin
    run_min_j = PRED.predict(20, cheapest_visual, 1).total_j
    assert err.value.min_j == pytest.approx(margin * 2.5 + margin * run_min_j)
    assert "already spent on encoding" in err.value.message


def test_joint_without_budget_is_eadaprune_with_the_output_cap() -> None:
    p = prepared(visual=(64,))
    out = plan("joint", p, ctx(max_tokens=17))
    assert out.max_new_tokens == 17 and out.budget_j is None
    assert out.visual_keep == plan("eadaprune", p, ctx()).visual_keep


def test_brevity_hint_is_sized_to_the_plan() -> None:
    p = prepared(visual=(64,), hint_tokens=12)
    assert plan("joint", p, ctx(budget=5.0)).brevity_hint is None
    short = plan("joint", p, ctx(budget=2.0, brevity=True))
    long = plan("joint", p, ctx(budget=30.0, brevity=True))
    assert short.brevity_hint and long.brevity_hint
    words = [int(s) for s in short.brevity_hint.split() if s.isdigit()]
    assert words and words[0] <= max(1, short.max_new_tokens)
    assert short.brevity_hint != long.brevity_hint


def test_brevity_hint_is_paid_for_and_only_where_the_engine_adds_it() -> None:
    with_hint, without = prepared(visual=(64,), hint_tokens=40), prepared(visual=(64,))
    budget = ctx(budget=3.0, brevity=True)
    hinted, bare = plan("joint", with_hint, budget), plan("joint", without, budget)
    # An engine that cannot add hints (hint_tokens 0) gets plans without one.
    assert hinted.brevity_hint and bare.brevity_hint is None
    # The hint's prompt tokens are in the prediction, so the answer gets fewer tokens for the same joules.
    assert hinted.max_new_tokens < bare.max_new_tokens
    assert hinted.predicted_j <= 3.0 and bare.predicted_j <= 3.0
    expected = PRED.predict(20 + 40, sum(hinted.visual_keep), hinted.max_new_tokens).total_j
    assert hinted.predicted_j == pytest.approx(expected)
    # Without brevity configured, the reserve costs nothing.
    assert plan("joint", with_hint, ctx(budget=3.0)) == plan("joint", without, ctx(budget=3.0))


def test_images_without_tokens_and_no_images() -> None:
    assert plan("joint", prepared(visual=()), ctx(budget=5.0)).visual_keep == ()
    assert plan("joint", prepared(visual=(0, 16)), ctx(budget=5.0)).visual_keep[0] == 0


def test_prunes_visual_says_which_policies_may_keep_fewer_visual_tokens() -> None:
    # The runtime skips decomposing images for a policy that does not prune; a policy that prunes
    # without saying so would lose its leverage basis (and pay for it inside the run).
    p = prepared(visual=(64, 32))
    for name in available_policies():
        policy = get_policy(name)
        pruned = False
        for budget in (None, 1000.0, 12.0, 8.0, 2.2):  # 2.2 J: every token and one output token do not fit
            try:
                keep = plan(name, p, ctx(budget=budget, max_tokens=40)).visual_keep
            except BudgetTooSmall:
                continue
            pruned |= keep != p.visual_tokens
        assert pruned == policy.prunes_visual, name
