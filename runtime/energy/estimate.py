"""Estimate meter for machines with no energy counter (such as a CPU-only box).

energy = `estimate_base_w` x wall time + `estimate_core_w` x CPU seconds of this process.

The CPU seconds come from `time.process_time()`, which counts every thread of this process
(PyTorch's intra-op pool included) and nothing else on the machine: the figure is this
process's share, not the machine's. Always reported as `source: "estimated"`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from joulecap.runtime.energy.base import Availability, MeterReading
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.types import EnergySource


class EstimateMeter:
    """A counter meter whose energy is a power model, not a measurement.

    Args:
        config: Supplies `estimate_base_w` and `estimate_core_w`.
        fallback_reason: Why a requested meter was replaced by this one (kept for
            `describe()` and `joulecap meters`), empty when chosen on purpose.
        clock: Wall clock (monotonic seconds).
        cpu_clock: CPU-time clock of this process (seconds).

    """

    source: EnergySource = "estimated"
    update_period_s: float = 0.0

    def __init__(
        self,
        config: EnergyConfig,
        *,
        fallback_reason: str = "",
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        self.name = "estimate:cpu"
        self.base_w = float(config.estimate_base_w)
        self.core_w = float(config.estimate_core_w)
        self.fallback_reason = fallback_reason
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._t0 = clock()
        self._cpu0 = cpu_clock()

    def is_available(self) -> Availability:
        """Report usable: it needs only the process clocks."""
        return Availability.yes("power model: base watts x wall time + watts per core x CPU seconds")

    def read(self) -> MeterReading:
        """Cumulative estimated energy since the meter was created."""
        t = self._clock()
        cpu = self._cpu_clock()
        energy_j = self.base_w * (t - self._t0) + self.core_w * (cpu - self._cpu0)
        return MeterReading(t_s=t, energy_j=energy_j)

    def describe(self) -> dict[str, object]:
        """Return the model's coefficients and, if any, why it replaced another meter."""
        facts: dict[str, object] = {
            "name": self.name,
            "source": self.source,
            "kind": "counter",
            "estimate_base_w": self.base_w,
            "estimate_core_w": self.core_w,
            "model": "base_w * wall_s + core_w * process_cpu_s",
        }
        if self.fallback_reason:
            facts["fallback_reason"] = self.fallback_reason
        return facts

    def close(self) -> None:
        """Nothing to release."""
