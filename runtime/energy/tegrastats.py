"""Jetson power from `tegrastats --interval N`, and the parser of its lines.

Power fields look like `VDD_IN 5704mW/5704mW` (current/average, JetPack 5-6) or
`VDD_IN 5704mW/5704mW/6011mW` (three values on newer releases); JetPack 4 prints bare numbers
(`POM_5V_IN 2430/2430`). The first value is the current power. Everything else on the line
(RAM, SWAP, CPU loads, clocks `X%@F`, temperatures `name@TC`) is ignored. Rail choice for the
total follows `jetson.select_total_rails` (VDD_IN on Orin Nano/NX, the sum on AGX Orin).

Not tested against a real tegrastats here (no Jetson): tests run the meter against a script
that prints recorded-format lines.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import threading
import time

from joulecap.runtime.energy.base import Availability, MeterError, MeterReading
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.jetson import select_total_rails
from joulecap.runtime.types import EnergySource

# NAME <cur>mW/<avg>mW[/<third>mW]; with JetPack 4 the mW suffixes are absent. The trailing
# (?![\w/]) refuses `RAM 2461/7620MB`-style fields whose numbers carry another unit.
_POWER_RE = re.compile(
    r"(?<![\w@])([A-Za-z][A-Za-z0-9_]*) "  # rail name
    r"(\d+(?:\.\d+)?)(?:mW)?/(\d+(?:\.\d+)?)(?:mW)?"  # current/average
    r"(?:/(\d+(?:\.\d+)?)(?:mW)?)?(?![\w/])"  # optional third value
)
_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM", "LFB", "MTS"})


def parse_tegrastats(line: str) -> dict[str, float]:
    """Rail name -> current power in mW for one tegrastats line.

    Args:
        line: One line of `tegrastats` output.

    Returns:
        Rails in the order printed; empty when the line has no power fields.

    """
    rails: dict[str, float] = {}
    for match in _POWER_RE.finditer(line):
        name = match.group(1)
        if name.upper() in _NOT_RAILS:
            continue
        rails[name] = float(match.group(2))
    return rails


class TegrastatsMeter:
    """Runs `tegrastats --interval N` and reports the latest total power (a power meter).

    The subprocess starts on the first read (or `is_available()`), a daemon thread parses its
    lines, and `close()` terminates it.

    Args:
        config: Supplies `tegrastats_path`, `tegrastats_interval_ms` and `jetson_rails`.

    """

    source: EnergySource = "measured"

    def __init__(self, config: EnergyConfig) -> None:
        self.path = config.tegrastats_path
        self.interval_ms = int(config.tegrastats_interval_ms)
        self.update_period_s = self.interval_ms / 1000.0
        self.configured_rails = tuple(config.jetson_rails)
        self.name = "tegrastats"
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._first_line = threading.Event()
        self._latest_w: float | None = None
        self._latest_rails: dict[str, float] = {}
        self._rails: list[str] | None = None
        self._error: str | None = None

    def _start(self) -> None:
        if self._proc is not None:
            return
        self._first_line.clear()
        self._latest_w, self._error = None, None
        exe = shutil.which(self.path)
        if exe is None:
            raise MeterError(f"tegrastats not found ({self.path!r} is not on PATH or not executable)")
        try:
            self._proc = subprocess.Popen(
                [exe, "--interval", str(self.interval_ms)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        except OSError as exc:
            raise MeterError(f"cannot start tegrastats: {exc}") from exc
        self._thread = threading.Thread(target=self._pump, name="joulecap-tegrastats", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):  # pipe closed under us at shutdown
            for line in proc.stdout:
                self._consume(line)
        with self._lock:
            self._error = f"tegrastats exited (status {proc.wait()})"
        self._first_line.set()

    def _consume(self, line: str) -> None:
        rails = parse_tegrastats(line)
        if not rails:
            return
        with self._lock:
            try:
                if self._rails is None:
                    self._rails = select_total_rails(list(rails), self.configured_rails)
                    self.name = "tegrastats:" + "+".join(self._rails)
                total_mw = sum(rails[r] for r in self._rails)
            except (ValueError, KeyError) as exc:
                self._error = f"tegrastats line lacks the selected rails: {exc}"
            else:
                self._latest_w = total_mw / 1000.0
                self._latest_rails = rails
                self._error = None
        self._first_line.set()

    def _wait_first(self) -> None:
        self._start()
        # tegrastats prints its first line after one interval.
        if not self._first_line.wait(timeout=2.0 * self.update_period_s + 2.0):
            raise MeterError("tegrastats printed no power line in time")

    def is_available(self) -> Availability:
        """Start tegrastats and wait for its first power line."""
        try:
            self._wait_first()
            reading = self.read()
        except MeterError as exc:
            self.close()
            return Availability.no(str(exc))
        return Availability.yes(f"rails {self._rails} = {reading.power_w:.2f} W")

    def read(self) -> MeterReading:
        """Latest total power (updated every `tegrastats_interval_ms`)."""
        self._wait_first()
        with self._lock:
            if self._error is not None:
                raise MeterError(self._error)
            if self._latest_w is None:
                raise MeterError("no tegrastats power reading yet")
            return MeterReading(t_s=time.monotonic(), power_w=self._latest_w)

    def read_rails_mw(self) -> dict[str, float]:
        """Return the last line's rails (mW), for display."""
        self._wait_first()
        with self._lock:
            return dict(self._latest_rails)

    def describe(self) -> dict[str, object]:
        """Return the executable, interval and rails."""
        return {
            "name": self.name,
            "source": self.source,
            "kind": "power",
            "executable": self.path,
            "interval_ms": self.interval_ms,
            "rails_summed": list(self._rails or []),
        }

    def close(self) -> None:
        """Stop the tegrastats subprocess this meter started."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=2.0)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()
