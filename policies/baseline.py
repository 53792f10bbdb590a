"""`baseline`: no energy limits at all."""

from __future__ import annotations

from joulecap.policies.base import PlanContext, Policy, all_visual, output_cap
from joulecap.policies.registry import register
from joulecap.runtime.types import Plan, PreparedRequest


@register("baseline")
class Baseline(Policy):
    """No limits: every visual token, the client's (or default) output cap; budgets are not held."""

    def plan(self, prepared: PreparedRequest, ctx: PlanContext) -> Plan:
        """Keep everything; cap output only by the client, the default and the context."""
        keep = all_visual(prepared)
        cap = output_cap(prepared, ctx, sum(keep))
        return self.make_plan(prepared, ctx, keep, cap, "baseline: no energy limits")
