"""Ledger configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LedgerConfig:
    """Where every request's plan and energy is recorded."""

    ledger_path: str | None = None
    """SQLite file of the ledger; default `<cache dir>/ledger.sqlite3`; `:memory:` keeps nothing."""
