"""Choose a meter: an explicit `--meter`, or detection in a fixed order; `joulecap meters`.

Detection order (`--meter auto`): nvml -> jetson (INA3221 sysfs) -> jtop -> tegrastats ->
rapl -> estimate. Each skipped backend is logged with its reason. An explicit meter that is
unavailable falls back to the estimate meter with a warning; the estimate meter keeps the
reason (`describe()["fallback_reason"]`). `replay` is only used when asked for.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from joulecap.runtime.energy.base import Availability, Meter, MeterReading, power_from_counter
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.estimate import EstimateMeter
from joulecap.runtime.energy.jetson import JetsonMeter
from joulecap.runtime.energy.jtop_meter import JtopMeter
from joulecap.runtime.energy.nvml import NvmlMeter
from joulecap.runtime.energy.rapl import RaplMeter
from joulecap.runtime.energy.replay import ReplayMeter
from joulecap.runtime.energy.tegrastats import TegrastatsMeter

log = logging.getLogger(__name__)

MeterFactory = Callable[[EnergyConfig], Meter]

METERS: dict[str, MeterFactory] = {
    "nvml": NvmlMeter,
    "jetson": JetsonMeter,
    "jtop": JtopMeter,
    "tegrastats": TegrastatsMeter,
    "rapl": RaplMeter,
    "estimate": EstimateMeter,
    "replay": ReplayMeter,
}
"""Backend name -> constructor. Constructors never touch hardware; `is_available()` does."""

AUTO_ORDER = ("nvml", "jetson", "jtop", "tegrastats", "rapl", "estimate")
"""Order in which `auto` tries the backends."""


def _try(name: str, config: EnergyConfig) -> tuple[Meter | None, Availability]:
    meter = METERS[name](config)
    try:
        availability = meter.is_available()
    except Exception as exc:  # a backend bug must not stop the server from starting
        availability = Availability.no(f"probe raised {type(exc).__name__}: {exc}")
    if availability.ok:
        return meter, availability
    meter.close()
    return None, availability


def create_meter(config: EnergyConfig) -> Meter:
    """Return the meter `config.meter` asks for, or the first available one for `auto`.

    Never fails: the estimate meter is always available.

    Raises:
        ValueError: `config.meter` names no known backend.

    """
    choice = config.meter.strip().lower()
    if choice != "auto" and choice not in METERS:
        raise ValueError(f"unknown meter {config.meter!r}; choose auto or one of {sorted(METERS)}")
    if choice == "auto":
        for name in AUTO_ORDER:
            meter, availability = _try(name, config)
            if meter is not None:
                log.info("energy meter: %s (%s)", meter.name, availability.reason or name)
                return meter
            log.info("meter %s skipped: %s", name, availability.reason)
        raise AssertionError("the estimate meter is always available")  # pragma: no cover
    meter, availability = _try(choice, config)
    if meter is not None:
        log.info("energy meter: %s (%s)", meter.name, availability.reason or choice)
        return meter
    reason = f"{choice}: {availability.reason}"
    log.warning("meter %s unavailable (%s); falling back to estimated energy", choice, availability.reason)
    return EstimateMeter(config, fallback_reason=reason)


@dataclass(frozen=True)
class MeterProbe:
    """One backend's status for `joulecap meters`.

    Attributes:
        name: Backend name (`nvml`, `jetson`, ...).
        availability: Whether it works here and why not.
        meter: The meter's report name when available (e.g. `nvml:0`), else empty.
        source: `measured`, `estimated` or `replayed`.
        reading: One live reading, None when unavailable or the read failed.
        power_w: Power from the reading, or from two counter readings `probe_interval_s` apart.

    """

    name: str
    availability: Availability
    meter: str = ""
    source: str = ""
    reading: MeterReading | None = None
    power_w: float | None = None


def probe_meters(config: EnergyConfig, *, probe_interval_s: float = 0.2) -> list[MeterProbe]:
    """Probe every backend (replay only when a trace is configured) and take one live reading."""
    names = [*AUTO_ORDER, "replay"] if config.replay_trace else list(AUTO_ORDER)
    probes = []
    for name in names:
        meter, availability = _try(name, config)
        if meter is None:
            probes.append(MeterProbe(name, availability))
            continue
        reading: MeterReading | None = None
        power: float | None = None
        try:
            first = meter.read()
            reading = first
            power = first.power_w
            if power is None and first.energy_j is not None:
                time.sleep(probe_interval_s)
                reading = meter.read()
                power = power_from_counter(first, reading)
        except Exception as exc:
            availability = Availability.no(f"available but the read failed: {exc}")
        finally:
            meter.close()
        probes.append(MeterProbe(name, availability, meter.name, meter.source, reading, power))
    return probes


def format_probes(probes: list[MeterProbe], chosen: str | None = None) -> str:
    """Render probes as a plain-text table; `chosen` marks the backend in use."""
    rows = [("", "backend", "status", "meter", "source", "power", "detail")]
    for p in probes:
        status = "ok" if p.availability.ok else "absent"
        power = f"{p.power_w:.2f} W" if p.power_w is not None else "-"
        mark = "*" if p.name == chosen else ""
        rows.append((mark, p.name, status, p.meter or "-", p.source or "-", power, p.availability.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def meters_command(config: EnergyConfig, out: TextIO | None = None) -> int:
    """`joulecap meters`: print every backend, one live reading each, and why others are absent.

    Returns:
        0 (the estimate meter is always there).

    """
    stream = out or sys.stdout
    probes = probe_meters(config)
    wanted = config.meter.strip().lower()
    order = AUTO_ORDER if wanted == "auto" else (wanted,)
    chosen = next((p.name for n in order for p in probes if p.name == n and p.availability.ok), "estimate")
    print(format_probes(probes, chosen), file=stream)
    if wanted not in ("auto", chosen):
        print(
            f"\n--meter {wanted} is unavailable here; the server would fall back to `estimate`.", file=stream
        )
    else:
        print(f"\n* = the meter `--meter {wanted}` uses here.", file=stream)
    return 0
