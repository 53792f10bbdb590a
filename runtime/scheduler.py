"""`Scheduler`: validates a request's energy options and asks its policy for a `Plan`."""

from __future__ import annotations

import math

from joulecap.policies import PlanContext, get_policy, policy_instance
from joulecap.policies.config import SchedulerConfig
from joulecap.runtime.errors import InvalidRequest
from joulecap.runtime.margin import FeasibilityMargin
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.types import Plan, PreparedRequest, Request


class Scheduler:
    """Turns prepared requests into plans with the request's (or the configured) policy.

    Args:
        config: Scheduler configuration (default policy, tau, budget range, ...).
        predictor: Energy model shared with the runtime (updated online by it).

    Raises:
        InvalidRequest: At construction, when the configured default policy does not exist.

    """

    def __init__(self, config: SchedulerConfig, predictor: Predictor) -> None:
        get_policy(config.policy)  # fail at start-up, not on the first request
        self.config = config
        self.predictor = predictor
        # The runtime loads the profile without knowing the scheduler's config; how the online
        # update learns (RLS forgetting, speed factor) is a scheduler setting.
        predictor.forgetting = config.rls_forgetting
        predictor.speed_alpha = config.speed_alpha
        self.margin = FeasibilityMargin(config.feasibility_margin, config.feasibility_quantile)
        # The same running quantile, of how far the first decode step exceeded its estimate:
        # the governor's premium on that step (no floor: it starts at 0 and follows the device).
        self.first_step = FeasibilityMargin(0.0, config.feasibility_quantile)

    def validate(self, prepared: PreparedRequest) -> tuple[float, float | None]:
        """The request's tau and budget, checked against the configured ranges (400 otherwise)."""
        request = prepared.request
        cfg = self.config
        tau = cfg.tau if request.tau is None else request.tau
        if not (isinstance(tau, int | float) and math.isfinite(tau) and 0.0 < tau <= 1.0):
            raise InvalidRequest(f"tau must be in (0, 1], got {tau!r}.", param="tau")
        budget = request.energy_budget_j
        if budget is not None:
            if not (isinstance(budget, int | float) and math.isfinite(budget) and budget > 0):
                raise InvalidRequest(
                    f"energy_budget_j must be a positive number, got {budget!r}.", param="energy_budget_j"
                )
            if not cfg.budget_min_j <= budget <= cfg.budget_max_j:
                raise InvalidRequest(
                    f"energy_budget_j {budget:g} J is outside the accepted range "
                    f"[{cfg.budget_min_j:g}, {cfg.budget_max_j:g}] J.",
                    param="energy_budget_j",
                )
        if request.max_tokens is not None and request.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {request.max_tokens}.", param="max_tokens")
        return float(tau), None if budget is None else float(budget)

    def prunes_visual(self, request: Request) -> bool:
        """Whether the request's policy may prune visual tokens (then `prepare` decomposes images).

        Raises:
            InvalidRequest: Unknown policy: the error `plan` would raise, before the images are encoded.

        """
        return get_policy(self._policy_name(request)).prunes_visual

    def _policy_name(self, request: Request) -> str:
        """The request's own policy, or the configured default."""
        return request.policy or self.config.policy

    def plan(self, prepared: PreparedRequest) -> Plan:
        """The plan for `prepared`.

        Raises:
            InvalidRequest: Unknown policy, tau or budget out of range, prompt over the context.
            BudgetTooSmall: The budget cannot pay for the smallest plan (carries `min_j`).

        """
        tau, budget = self.validate(prepared)
        policy = policy_instance(self._policy_name(prepared.request))
        ctx = PlanContext(
            config=self.config,
            predictor=self.predictor,
            tau=tau,
            max_tokens=prepared.request.max_tokens,
            budget_j=budget,
            spent_j=prepared.spent_j,
            feasibility_margin=self.margin.value(),
        )
        return policy.plan(prepared, ctx)
