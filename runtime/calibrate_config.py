"""Calibration configuration (the `calibrate` subcommand and the server's automatic calibration)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CalibrationConfig:
    """How an energy profile is made."""

    auto_calibrate: bool = True
    """Serving with no profile for (model, device, dtype): run the quick calibration sweep at
    start-up and save its profile for the next start (off: serve on the uncalibrated default and
    say so in every response's note)."""
    quick: bool = False
    """`calibrate`: the short sweep (the one start-up uses) instead of the full one."""
    resume: bool = True
    """`calibrate`: continue an interrupted sweep from its checkpoint."""
