"""Policies: each one's plan on hand-made prepared requests (random low-rank visual features)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from _factories import prepared

from joulecap.kernels import spectral_budget
from joulecap.policies import PlanContext, Policy, available_policies, get_policy, policy_instance, register
from joulecap.policies.base import MIN_J_RESOLUTION, fits, minimum_j, stated_min_j, too_small, visual_for
from joulecap.policies.config import SchedulerConfig
from joulecap.runtime.brevity import brevity_hint
from joulecap.runtime.errors import BudgetTooSmall, InvalidRequest
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.types import Plan, PreparedRequest

CFG = SchedulerConfig()
PRED = Predictor(1.0, 0.01, 0.1)  # 1 J fixed, 0.01 J per input token, 0.1 J per output token
MARGIN = 0.15  # a feasibility margin as the learner may hold it (relative)


def ctx(
    budget: float | None = None,
    max_tokens: int | None = None,
    encode: float = 0.0,
    *,
    promised: float | None = None,
    margin: float = MARGIN,
    plan_margin: float = 0.0,
    **cfg: object,
) -> PlanContext:
    config = replace(CFG, **cfg)
    return PlanContext(
        config=config,
        predictor=PRED,
        tau=config.tau,
        max_tokens=max_tokens,
        budget_j=budget,
        encode_j=encode,
        margin=margin,
        plan_margin=plan_margin,
        promised_min_j=promised,
    )


def stated_min(encode: float, visual: int, margin: float = MARGIN, text: int = 20) -> float:
    """The feasibility rule written out: the encode spent + the minimum run x (1 + margin), up to 1 uJ."""
    return encode + PRED.predict(text, visual, CFG.min_output_tokens).total_j * (1 + margin)


def budgeted(budget: float, encode: float, visual: int, headroom: float = CFG.budget_headroom) -> int:
    """Output tokens a budgeted plan gets: what is left after the encode and the headroom, >= 1."""
    return max(CFG.min_output_tokens, PRED.max_output_tokens(budget - encode - budget * headroom, 20, visual))


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
    assert out.policy == "baseline"
    # The budget is recorded (adherence can be measured) but not held, and never refused.
    assert out.budget_j == 0.5 and out.holds_budget is False and out.min_j is None
    assert out.predicted_j == pytest.approx(PRED.predict(20, 96, CFG.default_max_tokens).total_j)


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


def test_a_plan_carries_what_the_governor_and_the_response_need() -> None:
    p = prepared(visual=(64,))
    out = plan("output_budget", p, ctx(budget=10.0, encode=0.4, margin=0.2))
    run = PRED.predict(20, 64, out.max_new_tokens)
    assert out.holds_budget is True and out.budget_j == 10.0
    assert out.encode_j == 0.4
    assert out.predicted_prefill_j == pytest.approx(PRED.predict(20, 64, 0).prefill_j)  # 1.84 J
    assert out.predicted_j == pytest.approx(0.4 + run.total_j)
    assert out.margin == 0.2
    # The stated minimum: the encode as spent, the minimum run with the margin.
    assert out.min_j == pytest.approx(0.4 + PRED.predict(20, 64, 1).total_j * 1.2, abs=MIN_J_RESOLUTION)


def test_output_budget_refuses_with_min_joules() -> None:
    p = prepared(visual=(64,))
    with pytest.raises(BudgetTooSmall) as err:
        plan("output_budget", p, ctx(budget=1.5))
    min_j = stated_min(0.0, 64)  # (1 + 0.64 + 0.1) J x 1.15 = 2.001 J
    assert err.value.min_j == pytest.approx(min_j, abs=MIN_J_RESOLUTION)
    assert f"needs at least {err.value.min_j:.6f} J" in err.value.message
    assert "margin 0.150" in err.value.message and "already spent" not in err.value.message
    assert err.value.http_status == 422 and err.value.param == "energy_budget_j"


# ------------------------------------------------------------------ the feasibility rule


@pytest.mark.parametrize("encode,margin", [(0.0, 0.0), (0.0, MARGIN), (0.37, 0.2), (1.234567, 0.61)])
def test_minimum_j_is_the_rule_rounded_up_to_a_microjoule(encode: float, margin: float) -> None:
    p = prepared(visual=(64,), text_tokens=23)
    c = ctx(budget=None, encode=encode, margin=margin)
    min_j = minimum_j(p, c, 41)
    raw = stated_min(encode, 41, margin=margin, text=23)
    # Up (a picojoule of float slack aside): the stated number is never below the rule.
    assert raw - 1e-12 <= min_j < raw + MIN_J_RESOLUTION
    assert min_j / MIN_J_RESOLUTION == pytest.approx(round(min_j / MIN_J_RESOLUTION), abs=1e-6)
    # The encode is spent and measured: it counts once, without the margin.
    assert minimum_j(p, replace(c, encode_j=encode + 1.0), 41) == pytest.approx(min_j + 1.0, abs=2e-6)


def test_a_minimum_already_stated_for_the_request_caps_the_stated_minimum_only() -> None:
    p = prepared(visual=(64,))
    rule = minimum_j(p, ctx(encode=0.9), 64)
    # A retry of a request refused at 2.5 J: its dearer encode does not raise the bar over 2.5 J.
    assert stated_min_j(p, ctx(encode=0.9, promised=2.5), 64) == 2.5 < rule
    # The rule itself (what larger plans are priced with) does not move.
    assert minimum_j(p, ctx(encode=0.9, promised=2.5), 64) == rule
    # A promise above what the rule says now changes nothing.
    assert stated_min_j(p, ctx(encode=0.9, promised=rule + 1.0), 64) == rule


def test_minimum_j_pays_for_the_brevity_hint_only_when_it_is_added() -> None:
    p = prepared(visual=(64,), hint_tokens=40)
    bare = minimum_j(p, ctx(), 64)
    hinted = minimum_j(p, ctx(brevity=True), 64)
    assert bare == pytest.approx(stated_min(0.0, 64), abs=MIN_J_RESOLUTION)
    assert hinted == pytest.approx(stated_min(0.0, 64, text=60), abs=MIN_J_RESOLUTION)


def test_fits_accepts_a_budget_at_the_minimum_and_anything_without_one() -> None:
    assert fits(ctx(budget=None), 1e9)
    assert fits(ctx(budget=2.5), 2.5)
    assert not fits(ctx(budget=2.5 * (1 - 1e-9)), 2.5)


@pytest.mark.parametrize("name", ["output_budget", "joint"])
@pytest.mark.parametrize(
    "encode,margin,headroom",
    [(0.0, MARGIN, CFG.budget_headroom), (0.8, 0.3, CFG.budget_headroom), (0.3, 0.0, 0.5), (0.2, -0.2, 0.03)],
)
def test_a_budget_at_the_stated_minimum_is_accepted_and_just_below_it_refused(
    name: str, encode: float, margin: float, headroom: float
) -> None:
    # The contract: the number a 422 states (and a plan carries) is itself accepted, and nothing
    # below it is. Joint's stated minimum keeps only the visual floor.
    p = prepared(visual=(64, 32), rank=12)
    c = ctx(encode=encode, margin=margin, budget_headroom=headroom)
    floor = 64 + 32 if name == "output_budget" else 2 * CFG.visual_floor_tokens
    min_j = minimum_j(p, c, floor)
    assert min_j == pytest.approx(stated_min(encode, floor, margin=margin), abs=MIN_J_RESOLUTION)

    with pytest.raises(BudgetTooSmall) as err:
        plan(name, p, replace(c, budget_j=min_j * (1 - 1e-6)))
    assert err.value.min_j == min_j
    assert f"needs at least {min_j:.6f} J" in err.value.message

    ok = plan(name, p, replace(c, budget_j=min_j))
    assert ok.min_j == min_j and ok.budget_j == min_j
    assert sum(ok.visual_keep) == floor
    # The margin's share is not held back from the answer: the run gets what is left.
    assert ok.max_new_tokens == budgeted(min_j, encode, floor, headroom) >= CFG.min_output_tokens
    assert ok.holds_budget is True and ok.margin == margin and ok.encode_j == encode


def test_budget_within_the_feasibility_margin_is_refused() -> None:
    # The prefill cannot be stopped: a budget that only the point prediction fits is refused.
    p = prepared(visual=(64,))
    spectral = sum(plan("eadaprune", p, ctx()).visual_keep)
    for name, visual in (("output_budget", 64), ("joint", spectral)):
        exact = PRED.predict(20, visual, 1).total_j  # the cheapest answer (joint: floor = spectral)
        with pytest.raises(BudgetTooSmall):
            plan(name, p, ctx(budget=exact * (1 + MARGIN / 2), visual_floor_tokens=64))
        budget = exact * (1 + MARGIN) + MIN_J_RESOLUTION
        ok = plan(name, p, ctx(budget=budget, visual_floor_tokens=64))
        assert ok.max_new_tokens >= 1 and ok.predicted_j <= budget
        # With no margin the point prediction itself is enough.
        assert plan(name, p, ctx(budget=exact, margin=0.0, visual_floor_tokens=64)).max_new_tokens == 1


def test_headroom_never_makes_a_feasible_budget_infeasible() -> None:
    p = prepared(visual=(64,))
    stated = minimum_j(p, ctx(budget_headroom=0.5), 64)
    out = plan("output_budget", p, ctx(budget=stated, budget_headroom=0.5))
    assert out.max_new_tokens == 1


def test_visual_for_is_the_inverse_of_the_rule_in_the_visual_tokens() -> None:
    p = prepared(visual=(200,))
    c = ctx(encode=0.5, margin=0.2, budget_headroom=0.0)
    in_j = PRED.predict(0, 1, 0).total_j - PRED.predict(0, 0, 0).total_j  # 0.01 J per prompt token
    for v in (0, 7, 40, 150):
        # Half a token's worth above the stated minimum for v visual tokens: exactly v fit.
        budget = minimum_j(p, c, v) + 0.5 * in_j * 1.2
        assert visual_for(p, replace(c, budget_j=budget)) == v
    # An encode that spent the budget leaves no visual token at all.
    assert visual_for(p, replace(c, budget_j=0.5)) == -1
    # The headroom, when tighter than the margin, is left unplanned too.
    budget = minimum_j(p, c, 150) + 0.005
    tighter = replace(c, budget_j=budget, config=replace(CFG, budget_headroom=0.3))
    left = budget - 0.5
    assert left - 0.3 * budget < left / 1.2
    assert visual_for(p, tighter) == PRED.max_visual_tokens(left - 0.3 * budget, 20, 1) < 150
    with pytest.raises(ValueError, match="budget"):
        visual_for(p, c)


def test_the_planning_margin_sizes_plans_but_not_admission() -> None:
    p = prepared(visual=(200, 100), rank=64)
    # A budget just above the stated minimum at the floors: admitted by the feasibility margin.
    base = ctx(visual_floor_tokens=4, margin=0.2)
    floors_min = minimum_j(p, base, 8)
    budget = PRED.predict(20, 60, 1).total_j * 1.2
    assert budget > floors_min
    plain = ctx(budget=budget, visual_floor_tokens=4, margin=0.2)
    wide = ctx(budget=budget, visual_floor_tokens=4, margin=0.2, plan_margin=0.6)
    assert wide.planning_margin == 0.6 and plain.planning_margin == 0.2
    # A planning margin below the feasibility margin is never used.
    assert ctx(margin=0.2, plan_margin=0.1).planning_margin == 0.2
    for policy in ("joint", "answers_first"):
        loose, careful = plan(policy, p, plain), plan(policy, p, wide)
        # Same admission (same stated minimum), fewer visual tokens planned with the wider margin.
        assert loose.min_j == careful.min_j
        assert 8 <= sum(careful.visual_keep) < sum(loose.visual_keep)
        assert careful.plan_margin == 0.6 and careful.margin == 0.2
        # The plan's minimum answer fits the budget with the planning margin.
        assert minimum_j(p, wide, sum(careful.visual_keep), margin=0.6) <= budget
    # At the stated minimum itself the plan keeps the floors: accepted, never refused for the tail.
    at_min = plan("joint", p, ctx(budget=floors_min, visual_floor_tokens=4, margin=0.2, plan_margin=0.6))
    assert sum(at_min.visual_keep) == 8


def test_too_small_states_the_minimum_the_margin_and_the_encode_spent() -> None:
    err = too_small(ctx(budget=1.0, encode=0.25, margin=0.3), 2.1234567, "the smallest run")
    assert err.min_j == 2.1234567 and err.http_status == 422
    assert err.message == (
        "Energy budget 1.000000 J is too small: the smallest run needs at least 2.123457 J "
        "(margin 0.300) (0.250000 J already spent on encoding the images)."
    )


# ------------------------------------------------------------------ joint


def test_joint_prunes_first_then_spends_the_rest_on_output() -> None:
    p = prepared(visual=(64, 64), rank=4)
    budget = 6.0
    out = plan("joint", p, ctx(budget=budget))
    spectral = plan("eadaprune", p, ctx())
    assert out.visual_keep == spectral.visual_keep
    ob = plan("output_budget", p, ctx(budget=budget))
    assert out.max_new_tokens > ob.max_new_tokens  # pruning freed joules for the answer
    assert out.predicted_j <= budget * (1 - CFG.budget_headroom) + 1e-9
    assert out.holds_budget is True


def test_joint_lowers_visual_tokens_toward_the_floor_when_tight() -> None:
    p = prepared(visual=(200, 100), rank=64)
    spectral = plan("eadaprune", p, ctx()).visual_keep
    tight = PRED.predict(20, 40, 1).total_j  # 1.7 J: with the margin, room for 17 visual tokens
    out = plan("joint", p, ctx(budget=tight, visual_floor_tokens=4))
    assert sum(spectral) > 40
    assert visual_for(p, ctx(budget=tight, visual_floor_tokens=4)) == 17
    # Lowered proportionally, rounding each image's cut up: at most one token under the target each.
    assert 17 - 2 < sum(out.visual_keep) <= 17
    assert all(k >= 4 for k in out.visual_keep)
    assert out.max_new_tokens >= 1
    assert out.predicted_j <= tight + 1e-9
    assert "lowered" in out.reason


def test_joint_422_states_the_minimum_at_the_floor() -> None:
    p = prepared(visual=(200, 100), rank=64)
    with pytest.raises(BudgetTooSmall) as err:
        plan("joint", p, ctx(budget=1.0, visual_floor_tokens=4))
    min_j = stated_min(0.0, 8)
    assert err.value.min_j == pytest.approx(min_j, abs=MIN_J_RESOLUTION)
    assert f"needs at least {err.value.min_j:.6f} J" in err.value.message
    assert "8 visual token(s)" in err.value.message
    # and the minimum it states is indeed accepted
    ok = plan("joint", p, ctx(budget=err.value.min_j, visual_floor_tokens=4))
    assert ok.visual_keep == (4, 4) and ok.predicted_j <= ok.budget_j
    assert ok.max_new_tokens == budgeted(err.value.min_j, 0.0, 8) >= 1


@pytest.mark.parametrize("name", ["output_budget", "joint"])
def test_energy_already_spent_on_encoding_is_taken_off_the_budget(name: str) -> None:
    # The measured encode is spent before planning: the plan's run must fit what is left.
    p = prepared(visual=(64,))
    budget, spent = 6.0, 2.5
    fresh = plan(name, p, ctx(budget=budget))
    after = plan(name, p, ctx(budget=budget, encode=spent))
    assert after.max_new_tokens < fresh.max_new_tokens
    run_j = PRED.predict(20, sum(after.visual_keep), after.max_new_tokens).total_j
    assert after.predicted_j == pytest.approx(spent + run_j)  # the plan's figure is the whole request
    assert after.encode_j == spent
    assert run_j <= budget - spent - budget * CFG.budget_headroom + 1e-9
    # one more token would not fit what is left
    assert PRED.predict(20, sum(after.visual_keep), after.max_new_tokens + 1).total_j > (
        budget - spent - budget * CFG.budget_headroom
    )


@pytest.mark.parametrize("name", ["output_budget", "joint"])
def test_422_when_the_encode_alone_spent_the_budget(name: str) -> None:
    p = prepared(visual=(64,))
    with pytest.raises(BudgetTooSmall) as err:
        plan(name, p, ctx(budget=2.0, encode=2.5))
    # The encode spent plus the cheapest run with the margin; joint's cheapest run keeps only the
    # visual floor.
    cheapest_visual = 64 if name == "output_budget" else CFG.visual_floor_tokens
    assert err.value.min_j == pytest.approx(stated_min(2.5, cheapest_visual), abs=MIN_J_RESOLUTION)
    assert "2.500000 J already spent on encoding" in err.value.message


@pytest.mark.parametrize("name", ["output_budget", "joint"])
def test_a_retry_at_the_stated_minimum_is_accepted_when_its_encode_came_out_dearer(name: str) -> None:
    # Refused with an encode of 0.5 J, the client retries at the stated minimum; this time the
    # encode cost 0.9 J. The server holds what it stated (the scheduler's promises): accepted, with
    # the minimum answer (the governor holds the budget from there).
    p = prepared(visual=(64,))
    floor = 64 if name == "output_budget" else CFG.visual_floor_tokens
    stated = minimum_j(p, ctx(encode=0.5), floor)
    with pytest.raises(BudgetTooSmall):  # without the promise, the dearer encode raises the bar
        plan(name, p, ctx(budget=stated, encode=0.9))
    dear = plan(name, p, ctx(budget=stated, encode=0.9, promised=stated))
    assert dear.min_j == stated and dear.max_new_tokens == CFG.min_output_tokens
    # It plans the minimum answer the promise was made for, not more.
    assert sum(dear.visual_keep) == floor and dear.predicted_j <= stated + 0.9 - 0.5
    with pytest.raises(BudgetTooSmall) as err:
        plan(name, p, ctx(budget=stated * (1 - 1e-6), encode=0.9, promised=stated))
    assert err.value.min_j == stated


def test_joint_without_budget_is_eadaprune_with_the_output_cap() -> None:
    p = prepared(visual=(64,))
    out = plan("joint", p, ctx(max_tokens=17))
    assert out.max_new_tokens == 17 and out.budget_j is None
    assert out.visual_keep == plan("eadaprune", p, ctx()).visual_keep
    # Without a budget it still states its minimum (for /v1/energy/estimate): the floor's.
    assert out.min_j == minimum_j(p, ctx(), CFG.visual_floor_tokens)


def test_brevity_hint_is_sized_to_the_plan() -> None:
    p = prepared(visual=(64,), hint_tokens=12)
    assert plan("joint", p, ctx(budget=5.0)).brevity_hint is None
    short = plan("joint", p, ctx(budget=2.0, brevity=True))
    long = plan("joint", p, ctx(budget=30.0, brevity=True))
    assert short.max_new_tokens < long.max_new_tokens
    assert short.brevity_hint == brevity_hint(short.max_new_tokens)
    assert long.brevity_hint == brevity_hint(long.max_new_tokens)
    assert short.brevity_hint != long.brevity_hint


def test_brevity_hint_is_paid_for_and_only_where_the_engine_adds_it() -> None:
    with_hint, without = prepared(visual=(64,), hint_tokens=40), prepared(visual=(64,))
    budget = ctx(budget=3.0, brevity=True)
    hinted, bare = plan("joint", with_hint, budget), plan("joint", without, budget)
    # An engine that cannot add hints (hint_tokens 0) gets plans without one.
    assert hinted.brevity_hint == brevity_hint(hinted.max_new_tokens) and bare.brevity_hint is None
    # The hint's prompt tokens are in the prediction, so the answer gets fewer tokens for the same joules.
    assert hinted.max_new_tokens < bare.max_new_tokens
    assert hinted.predicted_j <= 3.0 and bare.predicted_j <= 3.0
    expected = PRED.predict(20 + 40, sum(hinted.visual_keep), hinted.max_new_tokens).total_j
    assert hinted.predicted_j == pytest.approx(expected)
    # Without brevity configured, the reserve costs nothing.
    assert plan("joint", with_hint, ctx(budget=3.0)) == plan("joint", without, ctx(budget=3.0))


def test_images_without_tokens_and_no_images() -> None:
    text_only = plan("joint", prepared(visual=()), ctx(budget=5.0))
    assert text_only.visual_keep == ()
    assert text_only.min_j == pytest.approx(stated_min(0.0, 0), abs=MIN_J_RESOLUTION)
    empty_first = plan("joint", prepared(visual=(0, 16)), ctx(budget=5.0))
    assert empty_first.visual_keep == (0, plan("eadaprune", prepared(visual=(0, 16)), ctx()).visual_keep[1])


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
