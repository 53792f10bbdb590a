"""Per-key daily joule quotas: what each key NAME spent this UTC day, and when it refills.

The allowance is per UTC calendar day and refills at 00:00 UTC, so `Retry-After` is the
seconds until then. A key is refused (429) once what it spent today reaches its quota; the
request that crosses the quota is not cut short, so a key can exceed its quota by at most one
request (the joule budget of that request bounds it).

Spending is charged by name after each request with its measured joules (`charge`). At
start-up the book can be seeded from the ledger (`seed_from_ledger`), so a restart does not
hand every key a fresh allowance.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from joulecap.runtime.errors import JoulecapError

log = logging.getLogger(__name__)

DAY_S = 86400.0


def day_start_s(now_s: float) -> float:
    """Unix time of the UTC midnight that began the day containing `now_s`."""
    return math.floor(now_s / DAY_S) * DAY_S


class QuotaBook:
    """Joules spent per key name in the current UTC day.

    Args:
        quota_j: The daily quota of a name (None: unlimited); usually `KeyStore.quota_j`, so a
            reloaded keys file changes quotas at once.
        clock: Unix time (tests pass a fake one).

    """

    def __init__(
        self, quota_j: Callable[[str], float | None], clock: Callable[[], float] = time.time
    ) -> None:
        self._quota_j = quota_j
        self._clock = clock
        self._lock = threading.Lock()
        self._day = day_start_s(clock())
        self._spent: dict[str, float] = {}

    def _roll(self, now: float) -> None:
        day = day_start_s(now)
        if day != self._day:
            self._day, self._spent = day, {}

    def charge(self, name: str | None, joules: float | None) -> None:
        """Add a request's joules to `name`'s day (None name or unknown joules: nothing)."""
        if name is None or joules is None or not math.isfinite(joules) or joules <= 0:
            return
        with self._lock:
            self._roll(self._clock())
            self._spent[name] = self._spent.get(name, 0.0) + float(joules)

    def spent_j(self, name: str) -> float:
        """Joules `name` spent today."""
        with self._lock:
            self._roll(self._clock())
            return self._spent.get(name, 0.0)

    def remaining_j(self, name: str) -> float | None:
        """Joules left today (None: no quota)."""
        quota = self._quota_j(name)
        return None if quota is None else max(0.0, quota - self.spent_j(name))

    def exhausted(self, name: str) -> bool:
        """Whether `name` has used its whole allowance for today."""
        remaining = self.remaining_j(name)
        return remaining is not None and remaining <= 0.0

    def retry_after_s(self) -> int:
        """Whole seconds until the allowance refills (next 00:00 UTC), at least 1."""
        now = self._clock()
        return max(1, math.ceil(day_start_s(now) + DAY_S - now))

    def seed(self, spent_j: dict[str, float]) -> None:
        """Set today's spending (e.g. from the ledger at start-up)."""
        with self._lock:
            self._roll(self._clock())
            for name, joules in spent_j.items():
                self._spent[name] = self._spent.get(name, 0.0) + max(0.0, float(joules))

    def seed_from_ledger(self, ledger_path: str) -> dict[str, float]:
        """Seed today's spending per key name from the ledger's rows (read-only); returns it."""
        if ledger_path == ":memory:" or not Path(ledger_path).is_file():
            return {}
        try:
            conn = sqlite3.connect(f"file:{Path(ledger_path).resolve()}?mode=ro", uri=True, timeout=30.0)
            try:
                rows = conn.execute(
                    "SELECT key_name, SUM(measured_j) FROM requests WHERE key_name IS NOT NULL "
                    "AND measured_j IS NOT NULL AND created_s >= ? GROUP BY key_name",
                    (day_start_s(self._clock()),),
                ).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:  # an older ledger without key_name: nothing to seed
            log.info("quota book not seeded from %s: %s", ledger_path, exc)
            return {}
        spent = {str(name): float(j or 0.0) for name, j in rows}
        self.seed(spent)
        return spent


class QuotaExceeded(JoulecapError):
    """A key spent its daily joule quota (429 with `Retry-After` until 00:00 UTC)."""

    http_status = 429
    error_type = "rate_limit_error"

    def __init__(self, name: str, quota_j: float, spent_j: float, retry_after_s: int) -> None:
        super().__init__(
            f"API key '{name}' has used its daily energy quota ({spent_j:.6g} of {quota_j:.6g} J); "
            f"it refills at 00:00 UTC, in {retry_after_s} s.",
            code="energy_quota_exceeded",
            headers={"Retry-After": str(int(retry_after_s))},
        )
