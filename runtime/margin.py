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

Timing errors are not normal: preemption and cache misses give them a long right tail. On the
project's 2-core CPU, 567 warm prefills of the quick policies benchmark had a median of -3%, a
robust sigma of 12% and a 99th percentile of +46% (median + 3 sigmas: +33%). A reading that must
keep clear of that tail (the planning margin) can therefore also ask for an empirical quantile of
a longer window (`at(z, quantile=)`); it is at least the robust value.
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
        window: Recent observations the median and robust sigma are read from.
        min_samples: Observations needed before they are used.
        tail_window: Recent observations empirical quantiles (`at(quantile=)`) are read from.

    """

    def __init__(
        self,
        floor: float,
        cap: float,
        z: float = 1.28,
        window: int = 50,
        min_samples: int = 5,
        tail_window: int = 200,
    ) -> None:
        if not 0.0 <= floor <= cap:
            raise ValueError(f"need 0 <= floor <= cap, got {floor}, {cap}")
        self.floor = floor
        self.cap = cap
        self.z = z
        self.min_samples = min_samples
        self.window = window
        # One history serves both readings: the fit reads its last `window`, quantiles all of it.
        self._history: deque[float] = deque(maxlen=max(window, tail_window))
        self._lock = threading.Lock()
        # Recomputed when a run is observed, not on every plan: planning is the hot path.
        # (median, robust sigma) of the window, replaced whole so a reader never mixes two fits;
        # the quantiles some view reads (`at`), replaced whole likewise.
        self._fit: tuple[float, float] | None = None
        self._quantiles: dict[float, float] = {}

    def observe(self, predicted_j: float, measured_j: float) -> None:
        """Record one warm run's predicted and measured energy (ignored unless both are positive)."""
        if not (math.isfinite(predicted_j) and math.isfinite(measured_j)):
            return
        if predicted_j <= 0 or measured_j <= 0:
            return
        with self._lock:
            self._history.append(measured_j / predicted_j - 1.0)
            self._refit()

    def _refit(self) -> None:
        # Called with the lock held: the fit and the registered quantiles, once `min_samples`
        # runs of the window are seen.
        n = len(self._history)
        if min(n, self.window) < self.min_samples:
            return
        history = np.fromiter(self._history, float, count=n)
        x = history[max(0, n - self.window) :]
        median = float(np.median(x))
        self._fit = (median, MAD_TO_SIGMA * float(np.median(np.abs(x - median))))
        if self._quantiles:
            self._quantiles = {q: float(np.quantile(history, q)) for q in self._quantiles}

    def value(self) -> float:
        """The current estimate."""
        return self.value_at(self.z)

    def value_at(self, z: float, quantile: float | None = None) -> float:
        """The estimate with `z` robust sigmas instead of the configured ones (same data, bounds).

        With `quantile` (registered through `at`), at least that empirical quantile of the tail
        window once `min_samples` runs are seen.
        """
        fit = self._fit
        if fit is None:
            return self.floor
        median, sigma = fit
        value = median + max(self.floor, z * sigma)
        if quantile is not None:
            value = max(value, self._quantiles.get(quantile, value))
        return min(self.cap, max(LOWEST, value))

    def at(self, z: float, quantile: float | None = None) -> OvershootAt:
        """A read-only view of this estimate at `z` robust sigmas and at least `quantile`.

        Args:
            z: Robust sigmas above the median.
            quantile: Empirical quantile of the tail window the view is at least, in (0, 1], or
                None for the robust value alone.

        Raises:
            ValueError: On a quantile outside (0, 1].

        """
        if quantile is not None:
            if not 0.0 < quantile <= 1.0:
                raise ValueError(f"quantile must be in (0, 1], got {quantile}")
            with self._lock:
                if quantile not in self._quantiles:
                    # Registered below any reading until the window is read again, now.
                    self._quantiles = {**self._quantiles, quantile: -math.inf}
                    self._refit()
        return OvershootAt(self, z, quantile)

    def stats(self, z: float | None = None, quantile: float | None = None) -> dict[str, float | int | None]:
        """Observations held and the current value (for the profile endpoint and benchmarks)."""
        z = self.z if z is None else z
        with self._lock:
            tail_n = len(self._history)
        n = min(tail_n, self.window)
        out: dict[str, float | int | None] = {
            "value": self.value_at(z, quantile),
            "samples": n,
            "floor": self.floor,
            "cap": self.cap,
            "z": z,
        }
        if quantile is not None:
            out.update(quantile=quantile, tail_samples=tail_n)
        return out


class OvershootAt:
    """The same estimate read further into (or nearer) the error's tail: `value_at(z, quantile)`.

    It holds no observations of its own: what its source learns, it reports.
    """

    def __init__(self, source: RobustOvershoot, z: float, quantile: float | None = None) -> None:
        self.source = source
        self.z = z
        self.quantile = quantile

    def value(self) -> float:
        """The source's estimate at this view's `z` and `quantile`."""
        return self.source.value_at(self.z, self.quantile)

    def stats(self) -> dict[str, float | int | None]:
        """As `RobustOvershoot.stats`, at this view's `z` and `quantile`."""
        return self.source.stats(self.z, self.quantile)
