"""CPU package energy from RAPL through the Linux powercap interface.

Reads `<root>/sys/class/powercap/intel-rapl:<N>/energy_uj` (a counter in microjoules) for
each top-level domain whose `name` is `package-*`, and sums the packages (sub-domains such as
`intel-rapl:0:0` core/uncore/dram are inside their package and `psys` overlaps the packages,
so neither is added). Recent kernels expose AMD's RAPL through the same interface.

The counter wraps at `max_energy_range_uj`; reads more often than one wrap period (minutes
at full load) keep it exact, which the background sampler does. Since Linux 5.10,
`energy_uj` is readable by root only (the PLATYPUS side channel, CVE-2020-8694), so a
permission error says so.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from joulecap.runtime.energy.base import Availability, MeterError, MeterReading
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.types import EnergySource

POWERCAP_DIR = "sys/class/powercap"
_TOP_DOMAIN = re.compile(r"^intel-rapl:(\d+)$")

PERMISSION_HINT = (
    "energy_uj is readable by root only since Linux 5.10 (CVE-2020-8694); run as root or grant "
    "read access to this file (e.g. a udev rule or `chmod a+r`)"
)


@dataclass
class _Domain:
    name: str
    energy_path: Path
    max_range_uj: int
    last_uj: int | None = None
    total_uj: int = 0


def _read_uj(path: Path) -> int:
    return int(path.read_text().strip())


def find_rapl_packages(sysfs_root: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """Top-level `package-*` RAPL domains as (name, directory), in index order."""
    base = Path(sysfs_root) / POWERCAP_DIR
    if not base.is_dir():
        return []
    found: list[tuple[int, str, Path]] = []
    for entry in base.iterdir():
        match = _TOP_DOMAIN.match(entry.name)
        if not match:
            continue
        name_file = entry / "name"
        name = name_file.read_text().strip() if name_file.is_file() else entry.name
        if name.startswith("package"):
            found.append((int(match.group(1)), name, entry))
    return [(name, path) for _, name, path in sorted(found)]


class RaplMeter:
    """Summed CPU package energy (a counter meter; wraparound handled here).

    Args:
        config: Supplies `sysfs_root`.

    """

    source: EnergySource = "measured"
    update_period_s: float = 0.001
    """RAPL updates its counters about every millisecond."""

    def __init__(self, config: EnergyConfig) -> None:
        self.sysfs_root = config.sysfs_root
        self.name = "rapl"
        self._domains: list[_Domain] | None = None

    def _open(self) -> list[_Domain]:
        if self._domains is None:
            packages = find_rapl_packages(self.sysfs_root)
            if not packages:
                raise MeterError(
                    f"no RAPL package domains under {os.path.join(self.sysfs_root, POWERCAP_DIR)}/"
                    "intel-rapl:* (no powercap driver: not an x86 host, a VM, or a container without sysfs)"
                )
            domains = []
            for name, path in packages:
                max_file = path / "max_energy_range_uj"
                max_range = _read_uj(max_file) if max_file.is_file() else 0
                domains.append(_Domain(name=name, energy_path=path / "energy_uj", max_range_uj=max_range))
            self._domains = domains
            self.name = "rapl:" + "+".join(d.name for d in domains)
        return self._domains

    def _advance(self, domain: _Domain) -> None:
        raw = _read_uj(domain.energy_path)
        if domain.last_uj is not None:
            delta = raw - domain.last_uj
            if delta < 0:
                # The counter wrapped: it ran from last up to max_energy_range_uj, then from 0.
                delta += domain.max_range_uj if domain.max_range_uj > 0 else 0
                delta = max(delta, 0)
            domain.total_uj += delta
        domain.last_uj = raw

    def is_available(self) -> Availability:
        """Find package domains and read each once."""
        try:
            domains = self._open()
            for d in domains:
                _read_uj(d.energy_path)
        except PermissionError as exc:
            return Availability.no(
                f"permission denied reading {exc.filename or 'energy_uj'}: {PERMISSION_HINT}"
            )
        except (MeterError, OSError, ValueError) as exc:
            return Availability.no(str(exc))
        return Availability.yes(f"domains {[d.name for d in domains]}")

    def read(self) -> MeterReading:
        """Cumulative package energy since the first read, wraparound removed."""
        domains = self._open()
        t = time.monotonic()
        try:
            for d in domains:
                self._advance(d)
        except PermissionError as exc:
            raise MeterError(f"permission denied reading {exc.filename}: {PERMISSION_HINT}") from exc
        except (OSError, ValueError) as exc:
            raise MeterError(f"RAPL read failed: {exc}") from exc
        return MeterReading(t_s=t, energy_j=sum(d.total_uj for d in domains) / 1e6)

    def describe(self) -> dict[str, object]:
        """Domains and their wrap ranges."""
        facts: dict[str, object] = {"name": self.name, "source": self.source, "kind": "counter"}
        if self._domains is not None:
            facts["domains"] = {d.name: {"max_energy_range_uj": d.max_range_uj} for d in self._domains}
        return facts

    def close(self) -> None:
        """Nothing held open between reads."""
