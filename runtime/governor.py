"""`Governor`: stops decoding before a request exceeds its joule budget.

Meters update coarsely (NVML about every 100 ms, RAPL/estimates by sampling), so the energy
"measured so far" lags. Between readings the governor trusts the plan: the spend is taken as the
larger of the measurement and the plan's encode plus predicted prefill plus `n` decode tokens, and
a token is only generated if that spend plus the predicted cost of one more token stays within
budget. When the measurement is current at every check (`measurement_is_current`: a meter read
afresh on each poll, and the run not sharing the device with a batch), the spend is the
measurement alone: a run cheaper than predicted may then use what it saved.

The next token's predicted cost is scaled by how much the run so far exceeded its prediction: a
device that is slower or busier than when the predictor learned (clocks, heat, contention) makes
every token dearer, and the first tokens give the governor no per-token measurement yet.

The first decode step is dearer than the steady per-token cost the predictor learns, and it is
priced before any step has been measured. So it carries a premium, `first_step_premium`, which the
`Learner` learns from the first steps governors measure (`first_step_observation`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from joulecap.runtime.types import Plan

_RECENT_TOKENS = 4
"""Measured per-token costs remembered for the next-token estimate."""
_MAX_SLOWDOWN = 10.0
"""Cap on the run-so-far overshoot factor applied to the next token (a meter glitch must not stop
every request at its first token)."""


class Governor:
    """Closed-loop stop rule for one running request.

    Args:
        plan: The request's plan: its budget (held only when `plan.holds_budget`), its measured
            `encode_j` and its `predicted_prefill_j`.
        token_j: Predicted joules of one generated token.
        energy_so_far_j: Returns the energy measured since the request started, encode included.
        first_step_premium: Relative extra cost of the first decode step over the next-token
            estimate (0: none).
        measurement_is_current: `energy_so_far_j` is exact at each call (no lag to cover with
            the prediction).

    """

    def __init__(
        self,
        plan: Plan,
        token_j: float,
        energy_so_far_j: Callable[[], float],
        first_step_premium: float = 0.0,
        measurement_is_current: bool = False,
    ) -> None:
        self.budget_j = plan.budget_j if plan.holds_budget else None
        self._energy_so_far_j = energy_so_far_j
        self.token_j = token_j
        self.encode_j = plan.encode_j
        self.prefill_j = plan.predicted_prefill_j
        self.slowdown = 1.0
        """Measured over predicted cost of the run so far (>= 1; scales the next token's cost)."""
        self.stopped_at: int | None = None
        self.last_spent_j = 0.0
        self._last: tuple[int, float] | None = None
        self._recent: deque[float] = deque(maxlen=_RECENT_TOKENS)
        self.first_step_premium = max(0.0, first_step_premium)
        self.measurement_is_current = measurement_is_current
        self.first_step_priced_j: float | None = None
        """The first decode step's estimate without the premium (set when it was priced)."""
        self.first_step_j: float | None = None
        """The first decode step's measured cost (set when a later check measured it)."""

    def next_token_j(self) -> float:
        """Cost of the next token: the prediction times the run's slowdown, or the dearest recent token.

        On a busy machine a token can cost several times the prediction (contention stretches
        its wall time); trusting only the prediction would overshoot by that difference.
        """
        if not self._recent:  # nothing measured yet: this is the first decode step
            return self.token_j * self.slowdown * (1.0 + self.first_step_premium)
        return max(self.token_j * self.slowdown, max(self._recent, default=0.0))

    def first_step_observation(self, tokens: int, decode_j: float) -> tuple[float, float] | None:
        """(priced, measured) joules of the run's first decode step, for the learner.

        None when that step was never priced (no budget held, or the run ended at its first
        token). When the second token ended the run (a stop token or the length cap) before a check
        could measure its step, the measurement is the run's decode phase (`decode_j`): that step
        plus the run's tail, which the governor must afford too when that step may be the last.
        """
        if self.first_step_priced_j is None:
            return None
        measured = self.first_step_j
        if measured is None and tokens == 2:
            measured = decode_j
        return None if measured is None else (self.first_step_priced_j, measured)

    def should_stop(self, n_generated: int) -> bool:
        """True when generating one more token would exceed the budget."""
        if self.budget_j is None:
            return False
        measured = self._energy_so_far_j()
        if self._last is not None and n_generated > self._last[0]:
            per_token = (measured - self._last[1]) / (n_generated - self._last[0])
            if self._last[0] == 1 and n_generated == 2:
                self.first_step_j = per_token
            self._recent.append(per_token)
        self._last = (n_generated, measured)
        run_predicted = self.prefill_j + self.token_j * n_generated
        if n_generated >= 1 and run_predicted > 0:
            ratio = (measured - self.encode_j) / run_predicted
            self.slowdown = min(_MAX_SLOWDOWN, max(1.0, ratio))
        predicted = self.encode_j + run_predicted
        self.last_spent_j = spent = measured if self.measurement_is_current else max(measured, predicted)
        if n_generated == 1:
            self.first_step_priced_j = self.token_j * self.slowdown
        if spent + self.next_token_j() > self.budget_j * (1 + 1e-9):  # float slack, not policy
            self.stopped_at = n_generated
            return True
        return False
