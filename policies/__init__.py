"""joulecap policies: how a joule budget becomes a plan (one module per policy, in a registry)."""

from joulecap.policies import (  # noqa: F401
    answers_first,
    baseline,
    eadaprune,
    fixed_output,
    fixed_prune,
    joint,
    output_budget,
)
from joulecap.policies.base import PlanContext, Policy
from joulecap.policies.registry import available_policies, get_policy, policy_instance, register

__all__ = ["PlanContext", "Policy", "available_policies", "get_policy", "policy_instance", "register"]
