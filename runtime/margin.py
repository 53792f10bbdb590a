"""`FeasibilityMargin`: how much the unstoppable part of a run may exceed its prediction.

Once a request's LM prefill starts, nothing stops it before the first token: the governor can
only act between tokens. A budget is therefore accepted only when the predicted cost of the
minimum answer, times `1 + margin`, fits it. A fixed margin is either too tight on a noisy
device (budgets overshoot) or too loose on a quiet one (budgets are refused needlessly), so the
margin follows the measured error: a high quantile of `measured / predicted - 1` over the
recent runs' prefill windows (start of the run to the first token), never below the
configured floor.
"""

from __future__ import annotations

import math
import threading
from collections import deque

import numpy as np


class FeasibilityMargin:
    """Running quantile of the prefill's relative overshoot, floored.

    Args:
        floor: Smallest margin ever used (the configured `feasibility_margin`).
        quantile: Quantile of the observed overshoot used as the margin, in (0, 1]. 0.99 keeps
            about 99% of the minimum answers' prefills within what was accepted.
        window: Recent runs remembered (older ones are forgotten, so it follows load changes).
        min_samples: Runs needed before the observations are used. With few runs the quantile is
            close to their maximum, which errs on the safe side (more refusals, fewer overshoots).

    """

    def __init__(self, floor: float, quantile: float, window: int = 200, min_samples: int = 5) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.floor = floor
        self.quantile = quantile
        self.min_samples = min_samples
        self._overshoot: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        # Recomputed when a run is observed, not on every plan: planning is the hot path.
        self._margin = floor

    def observe(self, predicted_j: float, measured_j: float) -> None:
        """Record one run's prefill: its predicted and measured energy (ignored if not positive)."""
        if not (math.isfinite(predicted_j) and math.isfinite(measured_j)):
            return
        if predicted_j <= 0 or measured_j < 0:
            return
        with self._lock:
            self._overshoot.append(measured_j / predicted_j - 1.0)
            if len(self._overshoot) >= self.min_samples:
                observed = float(np.quantile(np.fromiter(self._overshoot, float), self.quantile))
                self._margin = max(self.floor, observed)

    def value(self) -> float:
        """The margin to plan with now."""
        return self._margin

    def stats(self) -> dict[str, float | int]:
        """Observations held and the current margin (for the profile endpoint and benchmarks)."""
        with self._lock:
            n = len(self._overshoot)
        return {"samples": n, "margin": self.value(), "floor": self.floor, "quantile": self.quantile}
