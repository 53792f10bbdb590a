"""`PowerEnvelope`: a joule bucket shared by all requests (a battery or thermal envelope).

The bucket refills at `rate_w` joules per second up to `capacity_j`. A request reserves what it
is predicted to cost, with the feasibility margin (never more than its budget when the budget is
held), before running and settles with the energy it really used:
unused joules go back, overruns are charged (the level may go below zero, a debt the refill
pays off). A request is refused with 429 and a `Retry-After` from the refill rate when the
bucket cannot cover it; one larger than the whole bucket waits for a full bucket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from joulecap.runtime.errors import EnvelopeExhausted


@dataclass(frozen=True)
class EnvelopeConfig:
    """A joule bucket shared by all requests (off unless both fields are set)."""

    power_envelope_w: float | None = None
    """Refill rate in watts (with --power-envelope-j; None = no envelope)."""
    power_envelope_j: float | None = None
    """Capacity in joules (with --power-envelope-w; None = no envelope)."""

    def __post_init__(self) -> None:
        if (self.power_envelope_w is None) != (self.power_envelope_j is None):
            raise ValueError("--power-envelope-w and --power-envelope-j must be set together")
        for name in ("power_envelope_w", "power_envelope_j"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 when set, got {value}")


@dataclass(frozen=True)
class Reservation:
    """Joules taken from the envelope for one request."""

    amount_j: float


class PowerEnvelope:
    """Thread-safe token bucket of joules.

    Args:
        rate_w: Refill rate in watts (> 0).
        capacity_j: Bucket size in joules (> 0); the bucket starts full.
        clock: Monotonic clock in seconds (injectable for tests).

    """

    def __init__(
        self, rate_w: float, capacity_j: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not rate_w > 0 or not capacity_j > 0:
            raise ValueError(f"rate_w and capacity_j must be > 0, got {rate_w}, {capacity_j}")
        self.rate_w = float(rate_w)
        self.capacity_j = float(capacity_j)
        self._clock = clock
        self._lock = threading.Lock()
        self._level_j = self.capacity_j
        self._t = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level_j = min(self.capacity_j, self._level_j + self.rate_w * max(0.0, now - self._t))
        self._t = now

    def level_j(self) -> float:
        """Joules available now."""
        with self._lock:
            self._refill()
            return self._level_j

    def reserve(self, amount_j: float) -> Reservation:
        """Take `amount_j` for a request about to run.

        Raises:
            EnvelopeExhausted: The bucket cannot cover it now; `retry_after_s` is when it will.

        """
        amount = max(0.0, float(amount_j))
        need = min(amount, self.capacity_j)
        with self._lock:
            self._refill()
            if self._level_j < need:
                wait_s = (need - self._level_j) / self.rate_w
                raise EnvelopeExhausted(
                    f"The power envelope holds {self._level_j:.4g} J, the request needs {need:.4g} J; "
                    f"it refills at {self.rate_w:g} W (retry in {wait_s:.3g} s).",
                    retry_after_s=wait_s,
                )
            self._level_j -= amount
            return Reservation(amount)

    def settle(self, reservation: Reservation, used_j: float) -> None:
        """Return what a finished request did not use (or charge its overrun)."""
        with self._lock:
            self._refill()
            self._level_j = min(self.capacity_j, self._level_j + reservation.amount_j - max(0.0, used_j))
