"""`fixed_prune`: keep a fixed ratio r of each image's visual tokens."""

from __future__ import annotations

import math

from joulecap.policies.base import PlanContext, Policy, output_cap
from joulecap.policies.registry import register
from joulecap.runtime.types import Plan, PreparedRequest


@register("fixed_prune")
class FixedPrune(Policy):
    """Keep ratio r of each image's visual tokens (`--fixed-prune-ratio`); budgets are not held."""

    prunes_visual = True

    def plan(self, prepared: PreparedRequest, ctx: PlanContext) -> Plan:
        """Keep ceil(r * N_i) tokens of image i (at least one); output capped as usual."""
        r = ctx.config.fixed_prune_ratio
        keep = tuple(min(n, max(1, math.ceil(r * n))) if n else 0 for n in prepared.visual_tokens)
        cap = output_cap(prepared, ctx, sum(keep))
        return self.make_plan(prepared, ctx, keep, cap, f"fixed_prune: keep ratio {r:g}")
