"""How good one request's energy figure is: which meter, how it was sampled, how it was derived.

Recorded in every ledger row next to the joules so an operator can tell a 100 ms NVML counter
window from a power integral at 10 Hz, an interpolated short window or a model estimate:

- `meter_kind`: `counter` (a cumulative-energy counter, e.g. NVML's total-energy counter or
  RAPL), `power` (instantaneous power readings integrated by the sampler: Jetson INA3221, jtop,
  tegrastats, NVML power mode), `estimate` (a power model or the fallback, no hardware reading)
  or `replay` (a recorded trace).
- `sample_period_s`: the background sampler's period (1 / `--sample-hz`).
- `meter_update_period_s`: how often the meter's value itself changes (NVML ~0.1 s, jtop its
  interval, 0 = continuous).
- `interpolation`: `power` when the window was shorter than the update period and was
  integrated from power readings taken beside the counter, `scaled` when one update period
  around it was scaled down, None when the meter resolved the window itself.
- `idle_share`: the share of the joules that is the idle baseline (idle_j / total_j).

A reading the hardware does not support is never recorded as 0 J (`ledger_energy_j`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from joulecap.runtime.types import EnergyReport

MeterKind = Literal["counter", "power", "estimate", "replay"]

NOTE_FROM_POWER = "integrated from power readings"
"""What `EnergyMonitor.energy_between` writes in the note of a window integrated from power."""
NOTE_SCALED = "scaled from one update period"
"""What it writes for a window scaled from one update period around it."""


@dataclass(frozen=True)
class MeasurementQuality:
    """Measurement facts of one request's energy (see the module docstring for each field)."""

    meter: str
    meter_kind: MeterKind | None
    sample_period_s: float | None
    meter_update_period_s: float | None
    interpolated: bool
    interpolation: Literal["power", "scaled"] | None
    idle_share: float | None
    samples: int

    def ledger_fields(self) -> dict[str, Any]:
        """The ledger's measurement-quality columns (`meter` and `interpolated` exist already)."""
        return {
            "meter_kind": self.meter_kind,
            "sample_period_s": self.sample_period_s,
            "meter_update_period_s": self.meter_update_period_s,
            "interpolation": self.interpolation,
            "idle_share": self.idle_share,
            "samples": self.samples,
        }


def interpolation_of(report: EnergyReport) -> Literal["power", "scaled"] | None:
    """How an interpolated report's window was filled in (from the note the monitor writes)."""
    if not report.interpolated:
        return None
    if NOTE_SCALED in report.note:
        return "scaled"
    if NOTE_FROM_POWER in report.note:
        return "power"
    return None


def unsupported_reading(report: EnergyReport) -> bool:
    """True when a 'measured' report shows 0 J over a real window: the hardware gave no reading.

    Powered silicon never draws 0 W, so a measured window of positive length with no energy
    means a counter that does not move (unsupported on this device, a vGPU or MIG slice), not a
    free request.
    """
    return report.source == "measured" and report.duration_s > 0 and not report.total_j > 0


def ledger_energy_j(report: EnergyReport) -> float | None:
    """The joules to record for `report`: None for an unsupported reading, never a false 0 J."""
    return None if unsupported_reading(report) else report.total_j


def measurement_quality(
    report: EnergyReport,
    *,
    meter_kind: MeterKind | None = None,
    sample_period_s: float | None = None,
    meter_update_period_s: float | None = None,
) -> MeasurementQuality:
    """Quality facts of `report`; the meter's facts come from the monitor (`EnergyMonitor.quality`).

    Without them (None) only what the report itself says is filled in: estimates and replays
    are known from `source`; a measured report's kind stays None.
    """
    if report.source == "estimated":
        kind: MeterKind | None = "estimate"
    elif report.source == "replayed":
        kind = "replay"
    else:
        kind = meter_kind if meter_kind in ("counter", "power") else None
    idle_share = report.idle_j / report.total_j if report.total_j > 0 else None
    return MeasurementQuality(
        meter=report.meter,
        meter_kind=kind,
        sample_period_s=sample_period_s,
        meter_update_period_s=meter_update_period_s,
        interpolated=report.interpolated,
        interpolation=interpolation_of(report),
        idle_share=idle_share,
        samples=report.samples,
    )
