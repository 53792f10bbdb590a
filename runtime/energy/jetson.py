"""Jetson power through the INA3221 monitors in sysfs (hwmon interface, JetPack 5 and 6).

Layout read (the hwmon number differs per board and boot, so it is globbed)::

    <root>/sys/bus/i2c/drivers/ina3221*/<bus>-<addr>/hwmon/hwmon<N>/
        in<C>_label     rail name (C = 1..3, one per INA3221 channel)
        in<C>_input     bus voltage, mV
        curr<C>_input   current, mA
        power<C>_input  power, uW (only on drivers that provide it; preferred when present)

Channels labelled `NC` (not connected) or without a current/power file are skipped; only
channels 1..3 exist on an INA3221 (higher `in*` files of the mainline driver are shunt
voltages and the shunt-voltage sum, not rails).

Which rails make the total (the module's power, see DESIGN.md "Energy semantics"):

- **Orin Nano / Orin NX** (one INA3221 at 0x40): `VDD_IN`, `VDD_CPU_GPU_CV`, `VDD_SOC`.
  `VDD_IN` is the module input and already contains the other two, so the total is `VDD_IN`
  alone (summing would double count). Older boards' `POM_5V_IN` (Nano) is treated the same.
- **AGX Orin** (INA3221 at 0x40: `VDD_GPU_SOC`, `VDD_CPU_CV`, `VIN_SYS_5V0`; second INA3221
  at 0x41: `NC`, `VDDQ_VDD2_1V8AO`, `NC`): no module-input rail, so the total is the sum of
  every connected rail: `VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0 + VDDQ_VDD2_1V8AO`.
  This undercounts the carrier board and regulator losses; pass `--jetson-rails` to choose
  another set.

Confirmed against public sources (read via the project's search tool, not copied): the
jetson-stats power service (`jtop/core/power.py`) takes `VDD_IN`/`POM_5V_IN` as the total when
present and otherwise sums all rails, skips `NC` labels and channel 7; the mainline Linux
device tree for AGX Orin labels 0x40 `VDD_GPU_SOC`, `VDD_CPU_CV`, `VIN_SYS_5V0` and 0x41 input 1
`VDDQ_VDD2_1V8AO` (inputs 0 and 2 disabled); Orin NX/Nano sysfs examples read `VDD_IN`,
`VDD_CPU_GPU_CV`, `VDD_SOC` from `ina3221/1-0040/hwmon/hwmon*`. Not tested on a real Jetson
here (no hardware): the tests use sysfs trees built in a temp dir with these layouts.

JetPack 4 (`ina3221x` iio layout, `in_power<N>_input`) is not read; use `tegrastats` there.
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from joulecap.runtime.energy.base import Availability, MeterError, MeterReading
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.types import EnergySource

MODULE_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
"""Rails that carry the whole module's input power (Orin Nano/NX; older Nano)."""

HWMON_GLOB = "sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*"
"""Where INA3221 hwmon directories live, relative to the sysfs root."""

_NOT_CONNECTED = re.compile(r"^NC(\b|_|$)", re.IGNORECASE)


def select_total_rails(available: Sequence[str], configured: Sequence[str] = ()) -> list[str]:
    """Pick the rails whose sum is the module's power.

    Args:
        available: Rail names the sensor exposes.
        configured: Explicit choice (`--jetson-rails`); each must exist.

    Returns:
        `configured` when given, else the module-input rail when present, else all rails.

    Raises:
        ValueError: A configured rail does not exist, or there are no rails.

    """
    if configured:
        missing = [r for r in configured if r not in available]
        if missing:
            raise ValueError(f"rails {missing} not found; available: {sorted(available)}")
        return list(configured)
    for rail in MODULE_INPUT_RAILS:
        if rail in available:
            return [rail]
    if not available:
        raise ValueError("no power rails found")
    return list(available)


@dataclass(frozen=True)
class Ina3221Rail:
    """One connected INA3221 channel and the files that give its power."""

    label: str
    device: str
    """I2C device directory name, e.g. `1-0040`."""
    voltage_path: str
    current_path: str | None
    power_path: str | None


def _read_int(path: str) -> int:
    # sysfs values may carry a unit suffix on some drivers ("32760 ma"); take the number.
    with open(path, encoding="ascii") as f:
        return int(f.read().split()[0])


def scan_ina3221(sysfs_root: str | os.PathLike[str]) -> list[Ina3221Rail]:
    """Find every connected INA3221 rail under `sysfs_root` (no reads of the values)."""
    rails: list[Ina3221Rail] = []
    seen: set[str] = set()
    for hwmon in sorted(glob.glob(os.path.join(os.fspath(sysfs_root), HWMON_GLOB))):
        device = Path(hwmon).parent.parent.name
        for channel in (1, 2, 3):
            label_path = os.path.join(hwmon, f"in{channel}_label")
            if not os.path.isfile(label_path):
                continue
            with open(label_path, encoding="utf-8", errors="replace") as f:
                label = f.read().strip()
            if not label or _NOT_CONNECTED.match(label):
                continue
            voltage = os.path.join(hwmon, f"in{channel}_input")
            current = os.path.join(hwmon, f"curr{channel}_input")
            power = os.path.join(hwmon, f"power{channel}_input")
            has_power = os.path.isfile(power)
            has_vi = os.path.isfile(voltage) and os.path.isfile(current)
            if not (has_power or has_vi):
                continue
            name = label if label not in seen else f"{label}@{device}"
            seen.add(name)
            rails.append(
                Ina3221Rail(
                    label=name,
                    device=device,
                    voltage_path=voltage,
                    current_path=current if has_vi else None,
                    power_path=power if has_power else None,
                )
            )
    return rails


def read_rail_w(rail: Ina3221Rail) -> float:
    """Power of one rail in watts (uW when the driver gives power, else mV x mA)."""
    if rail.power_path is not None:
        return _read_int(rail.power_path) / 1e6
    assert rail.current_path is not None
    return _read_int(rail.voltage_path) * _read_int(rail.current_path) / 1e6


class JetsonMeter:
    """Module power of a Jetson from its INA3221 rails (a power meter: the sampler integrates).

    Args:
        config: Supplies `sysfs_root` and `jetson_rails`.

    """

    source: EnergySource = "measured"
    update_period_s: float = 0.0
    """The INA3221 converts continuously (a few ms per conversion); reads are current."""

    def __init__(self, config: EnergyConfig) -> None:
        self.sysfs_root = config.sysfs_root
        self.configured_rails = tuple(config.jetson_rails)
        self.name = "jetson"
        self._rails: list[Ina3221Rail] | None = None
        self._all: list[Ina3221Rail] = []

    def _open(self) -> list[Ina3221Rail]:
        if self._rails is None:
            found = scan_ina3221(self.sysfs_root)
            if not found:
                raise MeterError(
                    f"no INA3221 rails under {os.path.join(self.sysfs_root, HWMON_GLOB)}/ "
                    "(not a Jetson, no permission to sysfs, or a JetPack 4 iio layout)"
                )
            by_name = {r.label: r for r in found}
            try:
                chosen = select_total_rails(list(by_name), self.configured_rails)
            except ValueError as exc:
                raise MeterError(str(exc)) from exc
            self._all = found
            self._rails = [by_name[n] for n in chosen]
            self.name = "jetson:" + "+".join(chosen)
        return self._rails

    def is_available(self) -> Availability:
        """Scan sysfs for INA3221 rails and read them once."""
        try:
            rails = self._open()
            total = sum(read_rail_w(r) for r in rails)
        except PermissionError as exc:
            return Availability.no(f"permission denied reading INA3221 sysfs: {exc}")
        except (MeterError, OSError, ValueError) as exc:
            return Availability.no(str(exc))
        return Availability.yes(f"rails {[r.label for r in rails]} = {total:.2f} W")

    def read_rails_w(self) -> dict[str, float]:
        """Every connected rail's power in watts (for display; the total uses the selected ones)."""
        self._open()
        try:
            return {r.label: read_rail_w(r) for r in self._all}
        except (OSError, ValueError) as exc:
            raise MeterError(f"INA3221 read failed: {exc}") from exc

    def read(self) -> MeterReading:
        """Instantaneous power of the selected rails, summed."""
        rails = self._open()
        try:
            power_w = sum(read_rail_w(r) for r in rails)
        except (OSError, ValueError) as exc:
            raise MeterError(f"INA3221 read failed: {exc}") from exc
        return MeterReading(t_s=time.monotonic(), power_w=power_w)

    def describe(self) -> dict[str, object]:
        """Rails found, rails summed, and the sysfs root."""
        facts: dict[str, object] = {"name": self.name, "source": self.source, "kind": "power"}
        if self._rails is not None:
            facts["rails_summed"] = [r.label for r in self._rails]
            facts["rails_found"] = {r.label: r.device for r in self._all}
        facts["sysfs_root"] = self.sysfs_root
        return facts

    def close(self) -> None:
        """Nothing held open between reads."""
