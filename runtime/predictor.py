"""Energy predictor: a linear model of a request's joules, fitted offline and updated online.

Two forms from the paper share one representation here:

* the universal model over five features, `E = c0 + c1*S + c2*N_in + c3*N_out + c4*S*N_in +
  c5*S*N_out` (S = parameters in billions), which for one model collapses to
* the per-model form `E = P*(a_p*N_in + a_d*N_out + b)`, i.e. joules
  `E = b_j + in_j*N_in + out_j*N_out` with `in_j = P*a_p`, `out_j = P*a_d`, `b_j = P*b`.

The runtime plans with the per-model joule coefficients (`Predictor`), refines them after every
measured request by recursive least squares with forgetting, and keeps a rolling MAPE of the
predictions it made *before* seeing each measurement. `N_in` counts text tokens plus the
visual tokens actually kept.

Two time scales: RLS moves the coefficients slowly (it weighs the last ~50 requests), while a
*speed factor* multiplies every prediction by a running average of how far the last few
measurements were above or below the model. It follows what changes within seconds and touches
every cost alike: a shared CPU running slower while a neighbour thrashes the cache, a GPU
stepping its clocks down when hot. On the 2-core benchmark VM, the same request repeated for
30 s varies by 10-19% (coefficient of variation) in phases of about a second; see
`benchmarks/scheduler.py`'s held-out pass, which scores the predictor with and without it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from joulecap.runtime.types import Prediction

log = logging.getLogger(__name__)

UNIVERSAL_TERMS = ("intercept", "s", "n_in", "n_out", "s_n_in", "s_n_out")
"""Names of the universal model's coefficients, in feature order."""

# Feature scaling for RLS so that the covariance matrix is well conditioned (token counts are in
# the hundreds, the intercept is 1).
_IN_SCALE = 256.0
_OUT_SCALE = 64.0
_UNCALIBRATED_REL = 15.0
"""Prior std of a default coefficient relative to its value, over the relative measurement noise
(about 3x uncertain / 20% noise): the data win within a few requests."""
_UPDATE_CLIP = 2.0
"""An online update moves toward a measurement at most this factor away from the prediction."""
_CALIBRATED_REL = 1.0
"""The same for calibrated coefficients without a stored covariance (10% uncertain / 10% noise)."""
_WINDUP_FACTOR = 10.0
"""Anti-wind-up: covariance eigenvalues are capped at this multiple of the prior's largest."""
_MAPE_WINDOW = 100
_MIN_OUT_J = 1e-12
"""Floor on the per-output-token cost so budget arithmetic never divides by zero or goes negative."""


@dataclass(frozen=True)
class FitResult:
    """A least-squares fit with its quality.

    Attributes:
        coefficients: Term name -> fitted value.
        r2: Coefficient of determination on the fitted data.
        mape: Mean absolute percentage error on the fitted data (fraction, 0.05 = 5%).
        n: Number of samples.
        a_d_over_a_p: Per-output-token over per-input-token cost.

    """

    coefficients: dict[str, float]
    r2: float
    mape: float
    n: int
    a_d_over_a_p: float


def _quality(y: np.ndarray, y_hat: np.ndarray) -> tuple[float, float]:
    ss_res = float(np.sum((y - y_hat) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    mape = float(np.mean(np.abs(y - y_hat) / np.maximum(np.abs(y), 1e-12)))
    return r2, mape


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def fit_universal(
    params_b: Sequence[float], n_in: Sequence[float], n_out: Sequence[float], energy_j: Sequence[float]
) -> FitResult:
    """Fit the universal five-feature model (plus intercept) by least squares.

    With a single model size the S columns are collinear with the intercept and the N columns;
    numpy's minimum-norm solution still predicts correctly for that size.

    Args:
        params_b: Parameters in billions per sample.
        n_in: Prompt tokens (text + visual kept) per sample.
        n_out: Generated tokens per sample.
        energy_j: Measured joules per sample.

    """
    s, i, o, y = (np.asarray(v, dtype=np.float64) for v in (params_b, n_in, n_out, energy_j))
    x = np.stack([np.ones_like(s), s, i, o, s * i, s * o], axis=1)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    r2, mape = _quality(y, x @ coef)
    s_mean = float(s.mean())
    ratio = _ratio(coef[3] + coef[5] * s_mean, coef[2] + coef[4] * s_mean)
    return FitResult(dict(zip(UNIVERSAL_TERMS, map(float, coef), strict=True)), r2, mape, len(y), ratio)


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (active set: drop the most negative, refit)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if np.all(sol >= 0):
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


def fit_per_model(
    n_in: Sequence[float],
    n_out: Sequence[float],
    energy_j: Sequence[float],
    power_w: Sequence[float] | float,
    *,
    relative: bool = False,
) -> FitResult:
    """Fit `E = P*(a_p*N_in + a_d*N_out + b)` by least squares, P per sample (or one value).

    Coefficients are constrained to be >= 0 (a token never gives energy back); a noisy sweep
    would otherwise produce negative per-token costs that break budget arithmetic.

    Args:
        n_in: Prompt tokens per sample.
        n_out: Generated tokens per sample.
        energy_j: Measured joules per sample.
        power_w: Mean power per sample, or one value (1.0 makes the coefficients joules).
        relative: Minimise squared relative errors (weights 1/E) instead of absolute ones, so
            short requests are fitted as well as long ones (what MAPE and budgets care about).

    Returns:
        Coefficients `a_p_s`, `a_d_s`, `b_s` (seconds per token / fixed seconds), the mean power
        `power_w`, and the joule coefficients `in_j`, `out_j`, `b_j` at that power.

    """
    i, o, y = (np.asarray(v, dtype=np.float64) for v in (n_in, n_out, energy_j))
    p = np.broadcast_to(np.asarray(power_w, dtype=np.float64), y.shape)
    x = np.stack([p * i, p * o, p], axis=1)
    w = 1.0 / np.maximum(np.abs(y), 1e-12) if relative else np.ones_like(y)
    coef = _nonneg_lstsq(x * w[:, None], y * w)
    r2, mape = _quality(y, x @ coef)
    a_p, a_d, b = (float(c) for c in coef)
    p_mean = float(p.mean())
    coefficients = {
        "a_p_s": a_p,
        "a_d_s": a_d,
        "b_s": b,
        "power_w": p_mean,
        "in_j": a_p * p_mean,
        "out_j": a_d * p_mean,
        "b_j": b * p_mean,
    }
    return FitResult(coefficients, r2, mape, len(y), _ratio(a_d, a_p))


def universal_power_w(params_b: float, base_w: float = 42.2, per_b_w: float = 12.1) -> float:
    """Average power from the paper's fit `P = 12.1*S + 42.2` W."""
    return per_b_w * params_b + base_w


class Predictor:
    """Per-model linear energy model `E = b_j + in_j*N_in + out_j*N_out` with online RLS updates.

    Thread-safe: the engine thread updates it while request threads plan with it. `predict`
    and `max_output_tokens` are plain float arithmetic (microseconds) so planning stays cheap.

    Args:
        b_j: Fixed joules per request.
        in_j: Joules per prompt token (text + visual kept).
        out_j: Joules per generated token.
        calibrated: True when the coefficients come from a calibration of this device.
        source: Where the coefficients came from (`default`, `calibration:<meter>`, ...).
        forgetting: RLS forgetting factor in (0, 1].
        covariance: Initial RLS covariance (3x3, scaled features); default is wide when
            uncalibrated and moderate when calibrated.
        fit: Calibration fit quality (`r2`, `mape`, `n`) to report in `stats()`.
        power_w: Average power of the device for this model (reported; not used to predict).
        speed_alpha: Weight of the newest measurement in the speed factor, in [0, 1]; 0 keeps
            the factor at 1 (the scheduler sets this from its config).

    """

    def __init__(
        self,
        b_j: float,
        in_j: float,
        out_j: float,
        *,
        calibrated: bool = False,
        source: str = "default",
        forgetting: float = 0.98,
        covariance: Sequence[Sequence[float]] | None = None,
        fit: dict[str, Any] | None = None,
        power_w: float | None = None,
        speed_alpha: float = 0.0,
    ) -> None:
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        if not 0.0 <= speed_alpha <= 1.0:
            raise ValueError(f"speed_alpha must be in [0, 1], got {speed_alpha}")
        self._lock = threading.Lock()
        self._theta = np.array([b_j, in_j * _IN_SCALE, out_j * _OUT_SCALE], dtype=np.float64)
        if covariance is not None:
            self._cov = np.array(covariance, dtype=np.float64).reshape(3, 3)
        else:
            self._cov = self._relative_prior(_CALIBRATED_REL if calibrated else _UNCALIBRATED_REL)
        self._eig_max = _WINDUP_FACTOR * float(np.linalg.eigvalsh(self._cov).max())
        self._coef = (float(b_j), float(in_j), float(out_j))
        self.calibrated = calibrated
        self.source = source
        self.forgetting = forgetting
        self.fit = dict(fit or {})
        self.power_w = power_w
        self.speed_alpha = speed_alpha
        self._log_speed = 0.0
        self._speed = 1.0
        self.n_updates = 0
        self._errors: deque[float] = deque(maxlen=_MAPE_WINDOW)

    def _relative_prior(self, rel: float) -> np.ndarray:
        # Uncertainty proportional to each coefficient: a mismatch then rescales all of them
        # together (a slower or hungrier device) instead of piling onto the intercept, which
        # matters when traffic does not vary enough to tell prefill from decode. A floor keeps
        # zero coefficients learnable.
        mag = np.abs(self._theta)
        mag = np.maximum(mag, 0.05 * float(mag.max()) or 1.0)
        return np.diag((rel * mag) ** 2)

    # ------------------------------------------------------------------ prediction
    @property
    def coefficients(self) -> tuple[float, float, float]:
        """Current `(b_j, in_j, out_j)` of the linear model (before the speed factor)."""
        return self._coef

    @property
    def speed_factor(self) -> float:
        """Multiplier on every prediction: recent measurements over the linear model (1 = none)."""
        return self._speed

    def _linear(self, text_tokens: int, visual_tokens: int, output_tokens: int) -> Prediction:
        b_j, in_j, out_j = self._coef
        prefill = max(0.0, b_j + in_j * (text_tokens + visual_tokens))
        decode = max(0.0, out_j) * output_tokens
        return Prediction(prefill, decode, prefill + decode)

    def predict(self, text_tokens: int, visual_tokens: int, output_tokens: int) -> Prediction:
        """Predicted joules for a request that keeps `visual_tokens` and generates `output_tokens`."""
        base, speed = self._linear(text_tokens, visual_tokens, output_tokens), self._speed
        return Prediction(base.prefill_j * speed, base.decode_j * speed, base.total_j * speed)

    def decode_j_per_token(self) -> float:
        """Predicted joules of one generated token (always > 0)."""
        return max(self._coef[2] * self._speed, _MIN_OUT_J)

    def token_costs(self) -> tuple[float, float]:
        """Predicted joules of one prompt token and of one generated token (speed factor applied)."""
        _, in_j, out_j = self._coef
        return in_j * self._speed, out_j * self._speed

    def max_output_tokens(self, budget_j: float, text_tokens: int, visual_tokens: int) -> int:
        """Largest output length whose predicted total fits `budget_j` (0 when none does)."""
        left = budget_j - self.predict(text_tokens, visual_tokens, 0).total_j
        if left < 0:
            return 0
        return math.floor(left / self.decode_j_per_token())

    def max_visual_tokens(self, budget_j: float, text_tokens: int, output_tokens: int) -> int:
        """Largest total of kept visual tokens whose prediction fits `budget_j` (-1 when none)."""
        in_j = self._coef[1] * self._speed
        left = budget_j - self.predict(text_tokens, 0, output_tokens).total_j
        if left < 0:
            return -1
        if in_j <= 0:
            return 1 << 30
        return math.floor(left / in_j)

    # ------------------------------------------------------------------ learning
    def update(self, text_tokens: int, visual_tokens: int, output_tokens: int, energy_j: float) -> None:
        """Learn from one measured request (recursive least squares with forgetting).

        The regression is on relative errors (each row divided by the prediction), because
        measurement noise grows with the energy and budgets care about relative error. RLS
        fits the linear model to the measurement as it is; the speed factor then follows the
        linear model's residual ratio (a log-space running average), so a persistent change ends
        up in the coefficients and the factor returns to 1.
        """
        if not (math.isfinite(energy_j) and energy_j > 0):
            return
        n_in = text_tokens + visual_tokens
        x_raw = np.array([1.0, n_in / _IN_SCALE, output_tokens / _OUT_SCALE])
        with self._lock:
            predicted = self._linear(text_tokens, visual_tokens, output_tokens).total_j
            self._errors.append(abs(predicted * self._speed - energy_j) / energy_j)
            self._follow_speed(predicted, energy_j)
            scale = predicted if predicted > 0 else energy_j
            # One outlier (a cold first request, a burst of contention) must not wreck the model:
            # the target is clipped to within a factor of the prediction. A badly wrong default
            # still converges, a factor `_UPDATE_CLIP` per request.
            target = energy_j
            if predicted > 0:
                target = min(max(energy_j, predicted / _UPDATE_CLIP), predicted * _UPDATE_CLIP)
            x = x_raw / scale
            lam = self.forgetting
            px = self._cov @ x
            gain = px / (lam + float(x @ px))
            self._theta = self._theta + gain * (target / scale - float(x @ self._theta))
            if target != energy_j:
                # A clipped target is not a measurement: move, but do not grow more certain.
                self._commit()
                return
            cov = (self._cov - np.outer(gain, px)) / lam
            cov = (cov + cov.T) / 2
            # Forgetting with unexciting inputs (the same prompt over and over) inflates the
            # covariance without bound in the unexcited directions ("wind-up"); cap its
            # eigenvalues, leaving the excited (small) directions untouched.
            w, v = np.linalg.eigh(cov)
            if w.max() > self._eig_max or w.min() < 0:
                cov = (v * np.clip(w, 0.0, self._eig_max)) @ v.T
            self._cov = cov
            self._commit()

    def _follow_speed(self, linear_j: float, energy_j: float) -> None:
        if self.speed_alpha <= 0 or linear_j <= 0:
            return
        # Clipped like the RLS target: one cold start or stall moves the factor a bounded step.
        ratio = min(max(energy_j / linear_j, 1.0 / _UPDATE_CLIP), _UPDATE_CLIP)
        self._log_speed += self.speed_alpha * (math.log(ratio) - self._log_speed)
        self._speed = math.exp(self._log_speed)

    def _commit(self) -> None:
        th = self._theta
        self._coef = (float(th[0]), float(th[1]) / _IN_SCALE, float(th[2]) / _OUT_SCALE)
        self.n_updates += 1

    def rolling_mape(self) -> float | None:
        """Mean absolute percentage error (fraction) of the last predictions before each update."""
        errors = list(self._errors)
        return sum(errors) / len(errors) if errors else None

    def stats(self) -> dict[str, Any]:
        """Profile summary for `/v1/energy/profile` and `/metrics`."""
        b_j, in_j, out_j = self._coef
        return {
            "calibrated": self.calibrated,
            "source": self.source,
            "mape": self.rolling_mape(),
            "mape_window": len(self._errors),
            "r2": self.fit.get("r2"),
            "fit_mape": self.fit.get("mape"),
            "fit_samples": self.fit.get("n"),
            "n_updates": self.n_updates,
            "a_d_over_a_p": _ratio(out_j, in_j) if in_j > 0 else None,
            "power_w": self.power_w,
            "coefficients": {"b_j": b_j, "in_j": in_j, "out_j": out_j},
            "speed_factor": self._speed,
            "speed_alpha": self.speed_alpha,
        }

    def covariance(self) -> list[list[float]]:
        """The RLS covariance (scaled features), for saving with a profile."""
        with self._lock:
            return [[float(v) for v in row] for row in self._cov]
