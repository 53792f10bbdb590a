"""`output_budget`: max_new_tokens from the joule budget only; every visual token kept."""

from __future__ import annotations

from joulecap.policies.base import (
    PlanContext,
    Policy,
    all_visual,
    fits,
    output_cap,
    stated_min_j,
    text_tokens,
    too_small,
)
from joulecap.policies.registry import register
from joulecap.runtime.types import Plan, PreparedRequest


def budgeted_output(prepared: PreparedRequest, ctx: PlanContext, visual_kept: int, cap: int) -> int:
    """Output tokens whose run fits the budget left (`ctx.left_j`, less headroom) with `visual_kept`.

    Call only for an accepted budget (`fits`): the answer is then at least `min_output_tokens`.
    Headroom leaves a fraction of the budget for prediction error, but never turns an accepted
    budget into a refusal; the governor holds the rest.
    """
    budget_j, left_j = ctx.budget_j, ctx.left_j
    if budget_j is None or left_j is None:
        raise ValueError("budgeted_output needs a budget")
    spendable = left_j - budget_j * ctx.config.budget_headroom
    n = ctx.predictor.max_output_tokens(spendable, text_tokens(prepared, ctx), visual_kept)
    return min(cap, max(ctx.config.min_output_tokens, n))


@register("output_budget")
class OutputBudget(Policy):
    """Every visual token; max_new_tokens from the joules the budget leaves; the governor holds it."""

    holds_budget = True

    def plan(self, prepared: PreparedRequest, ctx: PlanContext) -> Plan:
        """Fit the output to the budget (422 with the minimum joules when even the minimum does not fit)."""
        keep = all_visual(prepared)
        cap = output_cap(prepared, ctx, sum(keep))
        min_j = stated_min_j(prepared, ctx, sum(keep))
        if ctx.budget_j is None:
            reason = "output_budget: no budget, output capped only"
            return self.make_plan(prepared, ctx, keep, cap, reason, min_j=min_j)
        if not fits(ctx, min_j):
            min_out = ctx.config.min_output_tokens
            what = f"the prompt with all visual tokens and {min_out} output token(s)"
            raise too_small(ctx, min_j, what)
        n = budgeted_output(prepared, ctx, sum(keep), cap)
        reason = f"output_budget: {n} tokens fit {ctx.budget_j:.4g} J"
        return self.make_plan(prepared, ctx, keep, n, reason, min_j=min_j)
