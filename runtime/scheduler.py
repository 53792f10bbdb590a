"""`Scheduler`: asks a request's policy for a `Plan`, with what the server has learned.

Requests reach it validated (`joulecap.runtime.requests`); it adds the planning context: the
predictor, the learned feasibility margin and the minimums it has stated (`promises`).
"""

from __future__ import annotations

from joulecap.policies import PlanContext, get_policy, policy_instance
from joulecap.policies.config import SchedulerConfig
from joulecap.runtime.errors import BudgetTooSmall
from joulecap.runtime.learning import Learner
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.promises import Promises
from joulecap.runtime.types import Plan, PreparedRequest, Request


class Scheduler:
    """Turns prepared requests into plans with the request's (or the configured) policy.

    Args:
        config: Scheduler configuration (default policy, tau, ...).
        predictor: Energy model shared with the runtime (updated online by the learner).
        learner: What the server learned: the feasibility margin, the expected encode.

    Raises:
        InvalidRequest: At construction, when the configured default policy does not exist.

    """

    def __init__(self, config: SchedulerConfig, predictor: Predictor, learner: Learner) -> None:
        get_policy(config.policy)  # fail at start-up, not on the first request
        self.config = config
        self.predictor = predictor
        self.learner = learner
        self.promises = Promises()

    def policy_name(self, request: Request) -> str:
        """The request's own policy, or the configured default."""
        return request.policy or self.config.policy

    def prunes_visual(self, request: Request) -> bool:
        """Whether the request's plan may prune visual tokens (then `prepare` decomposes images)."""
        return policy_instance(self.policy_name(request)).prunes(request)

    def defers_bases(self, request: Request) -> bool:
        """Whether the request's policy plans first without the decomposition (`Policy.defers_bases`)."""
        return policy_instance(self.policy_name(request)).defers_bases(request)

    def context(self, prepared: PreparedRequest) -> PlanContext:
        """The planning context for `prepared` now."""
        request = prepared.request
        return PlanContext(
            config=self.config,
            predictor=self.predictor,
            tau=self.config.tau if request.tau is None else request.tau,
            max_tokens=request.max_tokens,
            budget_j=request.energy_budget_j,
            encode_j=prepared.encode_j,
            margin=self.learner.margin.value(),
            plan_margin=self.learner.plan_margin.value(),
            promised_min_j=self.promises.get(request),
        )

    def plan(self, prepared: PreparedRequest) -> Plan:
        """The plan for `prepared`.

        Raises:
            InvalidRequest: Prompt over the context.
            BudgetTooSmall: The budget is below the feasibility rule's minimum (carries `min_j`).

        """
        policy = policy_instance(self.policy_name(prepared.request))
        try:
            return policy.plan(prepared, self.context(prepared))
        except BudgetTooSmall as exc:
            self.promises.hold(prepared.request, exc.min_j)  # a retry at this minimum is accepted
            raise
