"""The `Meter` protocol and the readings that cross the hardware boundary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from joulecap.runtime.types import EnergySource


@dataclass(frozen=True)
class Availability:
    """Whether a meter can be used here, and why not when it cannot."""

    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls, detail: str = "") -> Availability:
        """Usable; `detail` may say how (e.g. which rails or which NVML mode)."""
        return cls(True, detail)

    @classmethod
    def no(cls, reason: str) -> Availability:
        """Not usable, with the reason shown by `joulecap meters` and the factory's log."""
        return cls(False, reason)


class MeterError(RuntimeError):
    """A read failed (sensor gone, permission lost, subprocess died). The monitor falls back."""


@dataclass(frozen=True)
class MeterReading:
    """One reading, already converted to SI units.

    Attributes:
        t_s: `time.monotonic()` at the read.
        energy_j: Cumulative energy since an arbitrary origin (counter meters), else None.
        power_w: Instantaneous power, else None.

    """

    t_s: float
    energy_j: float | None = None
    power_w: float | None = None


@runtime_checkable
class Meter(Protocol):
    """A source of energy or power readings for the accelerator domain running the model.

    Implementations live one per file (`nvml.py`, `jetson.py`, `rapl.py`, ...), never probe
    hardware at import time, and convert units once in `read()`.
    """

    name: str
    """Identifier used in reports, e.g. `nvml:0`, `jetson:VDD_IN`, `estimate:cpu`."""
    source: EnergySource
    """`measured` for hardware counters, `estimated` for models, `replayed` for traces."""
    update_period_s: float
    """How often the underlying value changes (NVML energy about 0.1 s); 0 when continuous."""

    def is_available(self) -> Availability:
        """Probe the hardware (only when called) and say whether reads will work."""
        ...

    def read(self) -> MeterReading:
        """Take one reading."""
        ...

    def describe(self) -> dict[str, object]:
        """Return static facts for `joulecap meters` and `/v1/energy/meter`."""
        ...

    def close(self) -> None:
        """Release handles."""
        ...


def power_from_counter(a: MeterReading, b: MeterReading) -> float | None:
    """Average power between two counter readings, or None when it cannot be derived."""
    if a.energy_j is None or b.energy_j is None or b.t_s <= a.t_s:
        return None
    return (b.energy_j - a.energy_j) / (b.t_s - a.t_s)
