"""`output_budget`: max_new_tokens from the joule budget only; every visual token kept."""

from __future__ import annotations

from joulecap.policies.base import PlanContext, Policy, all_visual, output_cap, text_tokens, too_small
from joulecap.policies.registry import register
from joulecap.runtime.types import Plan, PreparedRequest


def budgeted_output(prepared: PreparedRequest, ctx: PlanContext, visual_kept: int, cap: int) -> int | None:
    """Output tokens whose run fits the budget left (`ctx.left_j`, less headroom) with `visual_kept`.

    Returns None when not even `min_output_tokens` fit the budget left less the feasibility
    margin. Headroom leaves a fraction of the budget for prediction error, but never turns a
    budget that fits the minimum answer into a refusal.
    """
    budget_j, left_j = ctx.budget_j, ctx.left_j
    if budget_j is None or left_j is None:
        raise ValueError("budgeted_output needs a budget")
    pred = ctx.predictor
    min_out = ctx.config.min_output_tokens
    n_text = text_tokens(prepared, ctx)
    feasible_j = left_j / (1.0 + ctx.margin)
    if left_j <= 0 or pred.max_output_tokens(feasible_j, n_text, visual_kept) < min_out:
        return None
    spendable = left_j - budget_j * ctx.config.budget_headroom
    n = pred.max_output_tokens(spendable, n_text, visual_kept)
    return min(cap, max(min_out, n))


@register("output_budget")
class OutputBudget(Policy):
    """Every visual token; max_new_tokens from the joules the budget leaves; the governor holds it."""

    holds_budget = True

    def plan(self, prepared: PreparedRequest, ctx: PlanContext) -> Plan:
        """Fit the output to the budget (422 with the minimum joules when even the minimum does not fit)."""
        keep = all_visual(prepared)
        cap = output_cap(prepared, ctx, sum(keep))
        if ctx.budget_j is None:
            return self.make_plan(prepared, ctx, keep, cap, "output_budget: no budget, output capped only")
        n = budgeted_output(prepared, ctx, sum(keep), cap)
        if n is None:
            min_out = ctx.config.min_output_tokens
            margin = 1.0 + ctx.margin
            run_min_j = margin * ctx.predictor.predict(text_tokens(prepared, ctx), sum(keep), min_out).total_j
            what = f"the prompt with all visual tokens and {min_out} output token(s)"
            raise too_small(ctx, run_min_j, what)
        return self.make_plan(prepared, ctx, keep, n, f"output_budget: {n} tokens fit {ctx.budget_j:.4g} J")
