"""`Governor`: stops decoding before a request exceeds its joule budget.

Meters update coarsely (NVML about every 100 ms, RAPL/estimates by sampling), so the energy
"measured so far" lags. Between readings the governor trusts the predictor: the spend is taken
as the larger of the measurement and the predicted prefill plus `n` decode tokens, and a token
is only generated if that spend plus the predicted cost of one more token stays within budget.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from joulecap.policies import get_policy
from joulecap.runtime.errors import InvalidRequest
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.types import Plan

_RECENT_TOKENS = 4
"""Measured per-token costs remembered for the next-token estimate."""


class Governor:
    """Closed-loop stop rule for one running request.

    Args:
        plan: The request's plan (its `budget_j` is the limit; None means never stop).
        predictor: Energy model used for the prefill and per-token costs.
        energy_so_far_j: Returns the energy measured since the request started.

    """

    def __init__(self, plan: Plan, predictor: Predictor, energy_so_far_j: Callable[[], float]) -> None:
        self.budget_j = plan.budget_j if self._holds(plan.policy) else None
        self._energy_so_far_j = energy_so_far_j
        # Text tokens are not in the plan; the prefill prediction is recovered from the plan's own
        # total so the governor agrees with the policy that planned it.
        self.token_j = predictor.decode_j_per_token()
        self.prefill_j = max(0.0, plan.predicted_j - self.token_j * plan.max_new_tokens)
        self.stopped_at: int | None = None
        self.last_spent_j = 0.0
        self._last: tuple[int, float] | None = None
        self._recent: deque[float] = deque(maxlen=_RECENT_TOKENS)

    @staticmethod
    def _holds(policy: str) -> bool:
        try:
            return get_policy(policy).holds_budget
        except InvalidRequest:  # a plan made outside the registry (tests, tools): hold its budget
            return True

    def next_token_j(self) -> float:
        """Cost of the next token: the prediction, or the dearest recent measured token if higher.

        On a busy machine a token can cost several times the prediction (contention stretches
        its wall time); trusting only the prediction would overshoot by that difference.
        """
        return max(self.token_j, max(self._recent, default=0.0))

    def should_stop(self, n_generated: int) -> bool:
        """True when generating one more token would exceed the budget."""
        if self.budget_j is None:
            return False
        measured = self._energy_so_far_j()
        if self._last is not None and n_generated > self._last[0]:
            per_token = (measured - self._last[1]) / (n_generated - self._last[0])
            self._recent.append(per_token)
        self._last = (n_generated, measured)
        predicted = self.prefill_j + self.token_j * n_generated
        self.last_spent_j = spent = max(measured, predicted)
        if spent + self.next_token_j() > self.budget_j * (1 + 1e-9):  # float slack, not policy
            self.stopped_at = n_generated
            return True
        return False
