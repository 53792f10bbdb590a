"""`output_budget`: max_new_tokens from the joule budget only; every visual token kept."""

from __future__ import annotations

from joulecap.policies.base import PlanContext, Policy, all_visual, output_cap, too_small
from joulecap.policies.registry import register
from joulecap.runtime.types import Plan, PreparedRequest


def budgeted_output(
    prepared: PreparedRequest, ctx: PlanContext, visual_kept: int, cap: int, budget_j: float
) -> int | None:
    """Output tokens that fit `budget_j` (less headroom) with `visual_kept` tokens.

    Returns None when not even `min_output_tokens` fit the budget less the feasibility margin.
    Headroom leaves a fraction of the budget for prediction error, but never turns a budget that
    fits the minimum answer into a refusal.
    """
    pred = ctx.predictor
    min_out = ctx.config.min_output_tokens
    feasible_j = budget_j / (1.0 + ctx.config.feasibility_margin)
    if pred.max_output_tokens(feasible_j, prepared.text_tokens, visual_kept) < min_out:
        return None
    spendable = budget_j * (1.0 - ctx.config.budget_headroom)
    n = pred.max_output_tokens(spendable, prepared.text_tokens, visual_kept)
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
        n = budgeted_output(prepared, ctx, sum(keep), cap, ctx.budget_j)
        if n is None:
            min_out = ctx.config.min_output_tokens
            margin = 1.0 + ctx.config.feasibility_margin
            min_j = margin * ctx.predictor.predict(prepared.text_tokens, sum(keep), min_out).total_j
            raise too_small(
                min_j, ctx.budget_j, f"the prompt with all visual tokens and {min_out} output token(s)"
            )
        return self.make_plan(prepared, ctx, keep, n, f"output_budget: {n} tokens fit {ctx.budget_j:.4g} J")
