"""Ledger configuration (its path is a `PathsConfig` field)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LedgerConfig:
    """How the request ledger is kept."""
