"""`Learner`: the one place where a finished request teaches the server.

After every run the runtime hands the learner an `Outcome`; the learner updates

- the predictor (RLS and speed factor) with the run's measured energy,
- the feasibility margin with how far the part of a run the governor cannot stop (the LM
  prefill to the first token) exceeded its prediction, and the planning margin from the same
  errors (further into their tail: it sizes plans, not refusals),
- the governor's first-step premium with the first decode step's priced and measured cost.

Only warm runs teach the margins: the first run after start-up and the
first after `cold_idle_s` of idleness pay for caches and clocks that later requests do not, and
would hold the margin up for the whole window. Replayed or interpolated energy teaches nothing
(it describes another device, or leans on the predictor itself).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from joulecap.runtime.margin import RobustOvershoot
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.types import ChatResult, EnergyReport

FIRST_STEP_PREMIUM_CAP = 3.0
"""Largest premium on the first decode step (a meter glitch must not stop every answer at one token)."""


@dataclass(frozen=True)
class LearningConfig:
    """How the server learns from the requests it serves."""

    rls_forgetting: float = 0.98
    """Predictor online update: forgetting factor of recursive least squares, in (0, 1]
    (1 = never forget; 0.98 weighs the last ~50 requests)."""
    speed_alpha: float = 0.2
    """Predictor online update: weight of the newest measurement in the speed factor, a running
    average of measured over predicted joules that multiplies every prediction, in [0, 1]
    (0 = off; 0.2 weighs the last ~5 requests)."""
    feasibility_margin: float = 0.1
    """The feasibility margin's least safety: a budget is accepted only when the predicted
    unstoppable part of its minimum answer (the LM prefill to the first token) times
    (1 + margin) fits. The margin follows the measured error of that part over the last 50 warm
    runs: its median plus `feasibility_z` robust sigmas, the latter at least this (and this alone
    until 5 runs are seen)."""
    feasibility_z: float = 1.28
    """Robust standard deviations of that error the margin adds above its median."""
    planning_z: float = 3.0
    """Robust standard deviations of the same error the planning margin adds above its median
    (at least `feasibility_z`). Admission and the stated minimum use the feasibility margin, so a
    refusal stays near the true minimum; how much of an accepted budget a plan fills uses this
    one, so a plan that fills its budget keeps clear of the error's tail (docs/budgets.md)."""
    planning_quantile: float = 0.995
    """The planning margin is also at least this empirical quantile of the same error over the
    last 200 warm runs, in (0, 1], or 0 for the robust value alone. Timing errors have a longer
    right tail than a normal one (on the 2-core CPU: 99th percentile +46% where median + 3 robust
    sigmas gave +33%). A plan filled to the q-quantile goes over about 1 - q of the time; the
    target is at most 1% of requests over, and 0.995 leaves half of that to the quantile's own
    sampling error."""
    feasibility_margin_max: float = 1.0
    """Ceiling of the feasibility margin (a meter glitch must not refuse every budget)."""
    cold_idle_s: float = 60.0
    """A run that starts after this long without one is cold: it is served and accounted, but
    does not teach the margins (neither does the first run after start-up)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.rls_forgetting <= 1.0:
            raise ValueError(f"rls_forgetting must be in (0, 1], got {self.rls_forgetting}")
        if not 0.0 <= self.speed_alpha <= 1.0:
            raise ValueError(f"speed_alpha must be in [0, 1], got {self.speed_alpha}")
        if not 0.0 <= self.feasibility_margin <= self.feasibility_margin_max <= 10.0:
            raise ValueError(
                "need 0 <= feasibility_margin <= feasibility_margin_max <= 10, got "
                f"{self.feasibility_margin}, {self.feasibility_margin_max}"
            )
        if not (math.isfinite(self.feasibility_z) and 0.0 <= self.feasibility_z <= 5.0):
            raise ValueError(f"feasibility_z must be in [0, 5], got {self.feasibility_z}")
        if not (math.isfinite(self.planning_z) and self.feasibility_z <= self.planning_z <= 6.0):
            raise ValueError(f"planning_z must be in [feasibility_z, 6], got {self.planning_z}")
        if not (math.isfinite(self.planning_quantile) and 0.0 <= self.planning_quantile <= 1.0):
            raise ValueError(f"planning_quantile must be in [0, 1], got {self.planning_quantile}")
        if not (math.isfinite(self.cold_idle_s) and self.cold_idle_s > 0):
            raise ValueError(f"cold_idle_s must be > 0, got {self.cold_idle_s}")


@dataclass(frozen=True)
class Outcome:
    """What one finished run teaches.

    Attributes:
        text_tokens: Prompt text tokens that went in (brevity hint included).
        visual_tokens_in: Visual tokens before pruning (what the encode processed).
        visual_tokens_kept: Visual tokens that entered the LM.
        output_tokens: Tokens generated.
        energy: The request's energy report (encode, prefill, decode).
        first_step: The governor's (priced, measured) joules of the first decode step, if any.
        started_s: `time.monotonic()` when the run started.

    """

    text_tokens: int
    visual_tokens_in: int
    visual_tokens_kept: int
    output_tokens: int
    energy: EnergyReport
    first_step: tuple[float, float] | None
    started_s: float

    @classmethod
    def of(cls, result: ChatResult, first_step: tuple[float, float] | None, started_s: float) -> Outcome:
        """The outcome of a finished request."""
        gen = result.generation
        text_tokens = gen.prefill_tokens - gen.visual_tokens_kept
        return cls(
            text_tokens,
            gen.visual_tokens_in,
            gen.visual_tokens_kept,
            len(gen.token_ids),
            result.energy,
            first_step,
            started_s,
        )


class Learner:
    """Owns the predictor's updates, the feasibility and planning margins and the first-step premium.

    Args:
        predictor: The served model's energy model (updated in place).
        config: Learning settings.

    """

    def __init__(self, predictor: Predictor, config: LearningConfig) -> None:
        self.predictor = predictor
        self.config = config
        self.margin = RobustOvershoot(
            config.feasibility_margin, config.feasibility_margin_max, z=config.feasibility_z
        )
        # The same errors read further into their tail: derived, not learned twice.
        self.plan_margin = self.margin.at(config.planning_z, config.planning_quantile or None)
        self.first_step = RobustOvershoot(0.0, FIRST_STEP_PREMIUM_CAP)
        self._last_active_s: float | None = None
        self._lock = threading.Lock()

    def mark_active(self, t_s: float | None = None) -> None:
        """Note engine activity that warms the device (the start-up warm-up)."""
        with self._lock:
            self._last_active_s = time.monotonic() if t_s is None else t_s

    def is_warm(self, started_s: float) -> bool:
        """Whether a run starting at `started_s` follows recent activity."""
        last = self._last_active_s
        return last is not None and started_s - last <= self.config.cold_idle_s

    def observe(self, outcome: Outcome) -> None:
        """Learn from one finished run (see the module docstring)."""
        warm = self.is_warm(outcome.started_s)
        self.mark_active()
        energy = outcome.energy
        if energy.source == "replayed" or energy.interpolated:
            return
        # Priced before the update: the margin follows the error of predictions made beforehand.
        first = self.predictor.predict(outcome.text_tokens, outcome.visual_tokens_kept, 1).total_j
        # The predictor models the LM run; the encode is measured, not predicted.
        self.predictor.update(
            outcome.text_tokens, outcome.visual_tokens_kept, outcome.output_tokens, energy.run_j
        )
        if not warm or outcome.output_tokens == 0:
            return
        self.margin.observe(first, energy.prefill_j)
        if outcome.first_step is not None:
            self.first_step.observe(*outcome.first_step)

    def stats(self) -> dict[str, object]:
        """The margins, for `/v1/energy/profile`."""
        return {
            "margin": self.margin.stats(),
            "plan_margin": self.plan_margin.stats(),
            "first_step_premium": self.first_step.stats(),
        }
