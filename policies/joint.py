"""`joint` (default): E-AdaPrune visual budget first, then max_new_tokens from the joules left.

When even the minimum answer does not fit, visual tokens are lowered toward a per-image floor;
if that still does not fit, the request is refused (422) with the minimum joules it needs.
"""

from __future__ import annotations

from joulecap.policies.base import (
    PlanContext,
    Policy,
    lower_visual,
    output_cap,
    spectral_keep,
    text_tokens,
    too_small,
)
from joulecap.policies.output_budget import budgeted_output
from joulecap.policies.registry import register
from joulecap.runtime.types import Plan, PreparedRequest


@register("joint")
class Joint(Policy):
    """Spectral visual budget, then output from the joules left; lowers visual tokens when tight."""

    holds_budget = True
    prunes_visual = True

    def plan(self, prepared: PreparedRequest, ctx: PlanContext) -> Plan:
        """Plan under the budget; see the module docstring."""
        keep = spectral_keep(prepared, ctx)
        if ctx.budget_j is None:
            cap = output_cap(prepared, ctx, sum(keep))
            return self.make_plan(prepared, ctx, keep, cap, f"joint: no budget, tau {ctx.tau:g}")
        budget = ctx.budget_j
        cap = output_cap(prepared, ctx, sum(keep))
        n = budgeted_output(prepared, ctx, sum(keep), cap)
        if n is not None:
            return self.make_plan(
                prepared, ctx, keep, n, f"joint: tau {ctx.tau:g}, {n} output tokens fit {budget:.4g} J"
            )
        # Tight budget: the minimum answer does not fit with the spectral budget; give up visual
        # tokens (proportionally, never below the floor) until it does.
        min_out = ctx.config.min_output_tokens
        floors = tuple(min(k, ctx.config.visual_floor_tokens) for k in keep)
        # Spend at most the budget less headroom, and never plan on the margin that absorbs the
        # prediction error of the (unstoppable) prefill.
        margin = 1.0 + ctx.margin
        n_text = text_tokens(prepared, ctx)
        left = budget - ctx.spent_j
        spendable = min(left - budget * ctx.config.budget_headroom, left / margin)
        total = -1  # the encode alone may have spent the budget
        if spendable > 0:
            total = ctx.predictor.max_visual_tokens(spendable, n_text, min_out)
        if total < sum(floors):
            run_min_j = margin * ctx.predictor.predict(n_text, sum(floors), min_out).total_j
            raise too_small(
                ctx, run_min_j, f"the prompt with {sum(floors)} visual token(s) and {min_out} output token(s)"
            )
        keep = lower_visual(keep, floors, total)
        cap = output_cap(prepared, ctx, sum(keep))
        n = budgeted_output(prepared, ctx, sum(keep), cap)
        if n is None:  # rounding in lower_visual only ever removes tokens, so this cannot happen
            n = min_out
        return self.make_plan(
            prepared,
            ctx,
            keep,
            n,
            f"joint: budget {budget:.4g} J tight, visual tokens lowered to {sum(keep)}, {n} output tokens",
        )
