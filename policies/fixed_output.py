"""`fixed_output`: a fixed output cap N."""

from __future__ import annotations

from joulecap.policies.base import PlanContext, Policy, all_visual, output_cap
from joulecap.policies.registry import register
from joulecap.runtime.types import Plan, PreparedRequest


@register("fixed_output")
class FixedOutput(Policy):
    """Cap output at N tokens (`--fixed-output-tokens`); every visual token; budgets are not held."""

    def plan(self, prepared: PreparedRequest, ctx: PlanContext) -> Plan:
        """Keep every visual token; generate at most N tokens."""
        keep = all_visual(prepared)
        n = min(output_cap(prepared, ctx, sum(keep)), ctx.config.fixed_output_tokens)
        return self.make_plan(prepared, ctx, keep, n, f"fixed_output: cap {ctx.config.fixed_output_tokens}")
