"""`joint`: E-AdaPrune visual budget first, then max_new_tokens from the joules left.

When even the minimum answer does not fit, visual tokens are lowered toward a per-image floor;
if that still does not fit, the request is refused (422) with the minimum joules it needs: the
feasibility rule (`minimum_j`) at the floors, so a refusal is never above the true minimum.
"""

from __future__ import annotations

from joulecap.policies.base import (
    PlanContext,
    Policy,
    fits,
    fits_plan,
    lower_visual,
    output_cap,
    spectral_keep,
    stated_min_j,
    too_small,
    visual_for,
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
        floors = tuple(min(k, ctx.config.visual_floor_tokens) for k in keep)
        min_j = stated_min_j(prepared, ctx, sum(floors))
        if ctx.budget_j is None:
            cap = output_cap(prepared, ctx, sum(keep))
            return self.make_plan(prepared, ctx, keep, cap, f"joint: no budget, tau {ctx.tau:g}", min_j=min_j)
        budget = ctx.budget_j
        if fits_plan(prepared, ctx, sum(keep)):
            n = budgeted_output(prepared, ctx, sum(keep), output_cap(prepared, ctx, sum(keep)))
            reason = f"joint: tau {ctx.tau:g}, {n} output tokens fit {budget:.4g} J"
            return self.make_plan(prepared, ctx, keep, n, reason, min_j=min_j)
        if not fits(ctx, min_j):
            min_out = ctx.config.min_output_tokens
            what = f"the prompt with {sum(floors)} visual token(s) and {min_out} output token(s)"
            raise too_small(ctx, min_j, what)
        # Tight budget: the minimum answer does not fit with the spectral budget; give up visual
        # tokens (proportionally, never below the floor) until it does.
        total = max(sum(floors), visual_for(prepared, ctx))
        keep = lower_visual(keep, floors, total)
        n = budgeted_output(prepared, ctx, sum(keep), output_cap(prepared, ctx, sum(keep)))
        reason = (
            f"joint: budget {budget:.4g} J tight, visual tokens lowered to {sum(keep)}, {n} output tokens"
        )
        return self.make_plan(prepared, ctx, keep, n, reason, min_j=min_j)
