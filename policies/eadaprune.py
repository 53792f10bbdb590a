"""`eadaprune`: the spectral visual budget only (E-AdaPrune), no output limit from energy."""

from __future__ import annotations

from joulecap.policies.base import PlanContext, Policy, output_cap, spectral_keep
from joulecap.policies.registry import register
from joulecap.runtime.types import Plan, PreparedRequest


@register("eadaprune")
class EAdaPrune(Policy):
    """Keep the fewest visual tokens covering tau of each image's spectral energy; budgets are not held."""

    prunes_visual = True

    def plan(self, prepared: PreparedRequest, ctx: PlanContext) -> Plan:
        """Per-image spectral budget; output capped by client, default and context only."""
        keep = spectral_keep(prepared, ctx)
        cap = output_cap(prepared, ctx, sum(keep))
        return self.make_plan(prepared, ctx, keep, cap, f"eadaprune: tau {ctx.tau:g}")
