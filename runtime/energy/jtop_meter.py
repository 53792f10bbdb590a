"""Jetson power through jetson-stats (`jtop`), when its service socket is present.

jetson-stats runs a root service that owns the sensors and serves them on `/run/jtop.sock`;
a client (`from jtop import jtop`) reads `jetson.power`, a dict `{"rail": {NAME: {"power":
mW, ...}}, "tot": {"power": mW, ...}}` whose `tot` is `VDD_IN` when present and otherwise the
sum of the rails (the same rule as `jetson.select_total_rails`). Useful inside containers that
mount the socket but not sysfs. The `jtop` package is imported only when the meter is used.

Not tested against a real jtop service here (no Jetson): the tests replace the `jtop` module
at its import boundary.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from typing import Any

from joulecap.runtime.energy.base import Availability, MeterError, MeterReading
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.types import EnergySource

SOCKET = "run/jtop.sock"
"""The jetson-stats service socket, relative to the sysfs root."""


class JtopMeter:
    """Total module power from the jetson-stats service (a power meter).

    Args:
        config: Supplies `sysfs_root`, `jtop_interval_s` and `jetson_rails`.

    """

    source: EnergySource = "measured"

    def __init__(self, config: EnergyConfig) -> None:
        self.socket_path = os.path.join(config.sysfs_root, SOCKET)
        self.interval_s = float(config.jtop_interval_s)
        self.update_period_s = self.interval_s
        self.rails = tuple(config.jetson_rails)
        self.name = "jtop:" + ("+".join(self.rails) if self.rails else "tot")
        self._client: Any = None

    def _open(self) -> Any:
        if self._client is None:
            if not os.path.exists(self.socket_path):
                raise MeterError(f"no jtop service socket at {self.socket_path} (jetson-stats not running)")
            try:
                module = importlib.import_module("jtop")
            except ImportError as exc:
                raise MeterError(f"jetson-stats is not installed (pip install jetson-stats): {exc}") from exc
            client = module.jtop(interval=self.interval_s)
            try:
                client.start()
            except Exception as exc:  # jtop raises its own JtopException types
                raise MeterError(f"cannot connect to the jtop service: {exc}") from exc
            self._client = client
        return self._client

    def _power_w(self) -> float:
        client = self._open()
        try:
            power = client.power
            if self.rails:
                return sum(float(power["rail"][r]["power"]) for r in self.rails) / 1000.0
            return float(power["tot"]["power"]) / 1000.0
        except KeyError as exc:
            raise MeterError(f"jtop reports no rail {exc}") from exc
        except Exception as exc:
            raise MeterError(f"jtop read failed: {exc}") from exc

    def is_available(self) -> Availability:
        """Socket present, package importable, service answering."""
        try:
            power_w = self._power_w()
        except MeterError as exc:
            self.close()
            return Availability.no(str(exc))
        return Availability.yes(f"jtop total {power_w:.2f} W")

    def read(self) -> MeterReading:
        """Latest power the service published (updated every `jtop_interval_s`)."""
        return MeterReading(t_s=time.monotonic(), power_w=self._power_w())

    def describe(self) -> dict[str, object]:
        """Socket, interval and rails."""
        return {
            "name": self.name,
            "source": self.source,
            "kind": "power",
            "socket": self.socket_path,
            "interval_s": self.interval_s,
            "rails_summed": list(self.rails) or "tot",
        }

    def close(self) -> None:
        """Disconnect from the service."""
        client, self._client = self._client, None
        if client is not None:
            # Closing a dead connection must not raise at shutdown.
            with contextlib.suppress(Exception):
                client.close()
