"""Robust running estimates of how far measurements exceed their predictions.

Two of them steer the budget contract:

- the **feasibility margin**: how much the part of a run that cannot be stopped (the LM prefill
  up to the first token; the encode before it is measured) may exceed its prediction. A budget is
  accepted only when the encode plus that part's prediction times `1 + margin` fits it
  (`joulecap.policies.base.minimum_j`);
- the governor's **first-step premium**: how much the first decode step costs over the steady
  per-token cost the predictor learns.

Both follow the measured relative overshoot `measured / predicted - 1` of recent warm runs. A
high quantile of a long window ratchets: one cold request or one noise spike sets it for the whole
window. So the estimate is robust instead: the window's median (the prediction's bias, which may be
negative: a prediction that runs high is corrected down) plus a safety of `z` robust standard
deviations (1.4826 x the median absolute deviation) but at least `floor`. One outlier in a window of
50 barely moves it, it comes back down as soon as the error falls, and it is clamped to
`[LOWEST, cap]`. A budget at the stated minimum then holds within the meter's noise (for normal
errors, `z = 1.28` leaves about one in ten answers at exactly the minimum a little over; budgets
above the minimum leave the governor room).
"""

from __future__ import annotations

import math
import threading
from collections import deque

import numpy as np

MAD_TO_SIGMA = 1.4826
"""Median absolute deviation to standard deviation, for normally distributed errors."""
LOWEST = -0.5
"""The least value: a prediction that runs high is corrected by at most half."""


class RobustOvershoot:
    """Median + max(z robust sigmas, floor) of the recent relative overshoots, clamped.

    Args:
        floor: Least safety above the median (also the value before `min_samples` observations).
        cap: Largest value ever returned (a meter glitch must not refuse every budget).
        z: Robust standard deviations above the median (1.28: about 90% of normal errors).
        window: Recent observations remembered.
        min_samples: Observations needed before they are used.

    """

    def __init__(
        self, floor: float, cap: float, z: float = 1.28, window: int = 50, min_samples: int = 5
    ) -> None:
        if not 0.0 <= floor <= cap:
            raise ValueError(f"need 0 <= floor <= cap, got {floor}, {cap}")
        self.floor = floor
        self.cap = cap
        self.z = z
        self.min_samples = min_samples
        self._overshoot: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        # Recomputed when a run is observed, not on every plan: planning is the hot path.
        # (median, robust sigma) of the window, replaced whole so a reader never mixes two fits.
        self._fit: tuple[float, float] | None = None

    def observe(self, predicted_j: float, measured_j: float) -> None:
        """Record one warm run's predicted and measured energy (ignored unless both are positive)."""
        if not (math.isfinite(predicted_j) and math.isfinite(measured_j)):
            return
        if predicted_j <= 0 or measured_j <= 0:
            return
        with self._lock:
            self._overshoot.append(measured_j / predicted_j - 1.0)
            if len(self._overshoot) >= self.min_samples:
                x = np.fromiter(self._overshoot, float)
                median = float(np.median(x))
                self._fit = (median, MAD_TO_SIGMA * float(np.median(np.abs(x - median))))

    def value(self) -> float:
        """The current estimate."""
        return self.value_at(self.z)

    def value_at(self, z: float) -> float:
        """The estimate with `z` robust sigmas instead of the configured ones (same data, bounds)."""
        fit = self._fit
        if fit is None:
            return self.floor
        median, sigma = fit
        return min(self.cap, max(LOWEST, median + max(self.floor, z * sigma)))

    def at(self, z: float) -> OvershootAt:
        """A read-only view of this estimate at `z` robust sigmas (e.g. the planning margin)."""
        return OvershootAt(self, z)

    def stats(self, z: float | None = None) -> dict[str, float | int]:
        """Observations held and the current value (for the profile endpoint and benchmarks)."""
        z = self.z if z is None else z
        with self._lock:
            n = len(self._overshoot)
        return {"value": self.value_at(z), "samples": n, "floor": self.floor, "cap": self.cap, "z": z}


class OvershootAt:
    """The same robust estimate read further into (or nearer) the error's tail: `value_at(z)`.

    It holds no observations of its own: what its source learns, it reports.
    """

    def __init__(self, source: RobustOvershoot, z: float) -> None:
        self.source = source
        self.z = z

    def value(self) -> float:
        """The source's estimate at this view's `z`."""
        return self.source.value_at(self.z)

    def stats(self) -> dict[str, float | int]:
        """As `RobustOvershoot.stats`, at this view's `z`."""
        return self.source.stats(self.z)
