"""Ledger configuration (its path is a `PathsConfig` field)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LedgerConfig:
    """How long the request ledger keeps rows (its path is a `PathsConfig` field)."""

    ledger_max_rows: int | None = None
    """Keep at most this many rows (the oldest are deleted first); none: no row limit."""
    ledger_max_days: float | None = None
    """Delete rows older than this many days; none: no age limit."""
    ledger_prune_interval_s: float = 60.0
    """How often a running server applies the two limits above."""

    def __post_init__(self) -> None:
        if self.ledger_max_rows is not None and self.ledger_max_rows < 1:
            raise ValueError(f"ledger_max_rows must be >= 1, got {self.ledger_max_rows}")
        if self.ledger_max_days is not None and not (
            math.isfinite(self.ledger_max_days) and self.ledger_max_days > 0
        ):
            raise ValueError(f"ledger_max_days must be a finite number > 0, got {self.ledger_max_days}")
        if not (math.isfinite(self.ledger_prune_interval_s) and self.ledger_prune_interval_s > 0):
            raise ValueError(f"ledger_prune_interval_s must be > 0, got {self.ledger_prune_interval_s}")
