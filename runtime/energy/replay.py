"""Replay a recorded power trace against the wall clock (`source: "replayed"`, never measured).

Trace format (CSV; lines starting with `#` are comments)::

    time_s,VDD_IN_mw,VDD_CPU_GPU_CV_mw,VDD_SOC_mw
    0.0,5012,610,1480
    0.1,5030,615,1482
    ...

`time_s` rises strictly; each `<RAIL>_mw` column is one rail's power in milliwatts, for
example converted from a tegrastats capture on a Jetson. The total uses the Jetson rail rule
(`VDD_IN` when present, else the sum; `--jetson-rails` overrides). Power between rows is
linear; energy is the exact integral of that piecewise-linear power, so readings depend only
on the clock and the trace: runs are deterministic. The trace clock starts at the first read;
with `replay_loop` it starts over at the end, else it holds the last power.
"""

from __future__ import annotations

import bisect
import csv
import io
import time
from collections.abc import Callable
from pathlib import Path

from joulecap.runtime.energy.base import Availability, MeterError, MeterReading
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.jetson import select_total_rails
from joulecap.runtime.types import EnergySource


class PowerTrace:
    """A piecewise-linear total-power trace with its cumulative energy at each row.

    Args:
        times_s: Row times (strictly increasing, first may be nonzero; it is shifted to 0).
        power_w: Total power at each row.

    """

    def __init__(self, times_s: list[float], power_w: list[float]) -> None:
        if len(times_s) < 2 or len(times_s) != len(power_w):
            raise ValueError("a trace needs at least two rows of (time_s, power)")
        t0 = times_s[0]
        self.t = [t - t0 for t in times_s]
        if any(b <= a for a, b in zip(self.t, self.t[1:], strict=False)):
            raise ValueError("trace time_s must increase strictly")
        self.p = list(power_w)
        self.e = [0.0]
        for i in range(1, len(self.t)):
            self.e.append(self.e[-1] + (self.t[i] - self.t[i - 1]) * (self.p[i] + self.p[i - 1]) / 2.0)

    @property
    def duration_s(self) -> float:
        """Length of the trace."""
        return self.t[-1]

    @property
    def total_j(self) -> float:
        """Energy of one full pass."""
        return self.e[-1]

    def power_at(self, t_s: float) -> float:
        """Power at trace time `t_s` in [0, duration]."""
        i = min(max(bisect.bisect_right(self.t, t_s) - 1, 0), len(self.t) - 2)
        frac = (t_s - self.t[i]) / (self.t[i + 1] - self.t[i])
        return self.p[i] + frac * (self.p[i + 1] - self.p[i])

    def energy_at(self, t_s: float) -> float:
        """Energy from trace time 0 to `t_s` in [0, duration]."""
        i = min(max(bisect.bisect_right(self.t, t_s) - 1, 0), len(self.t) - 2)
        return self.e[i] + (t_s - self.t[i]) * (self.p[i] + self.power_at(t_s)) / 2.0


def load_trace(path: str | Path, rails: tuple[str, ...] = ()) -> tuple[PowerTrace, list[str]]:
    """Read a trace CSV and total the selected rails.

    Returns:
        The total-power trace and the rails summed.

    Raises:
        ValueError: Malformed file, missing `time_s`, no `_mw` columns, unknown rails.

    """
    text = Path(path).read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if "time_s" not in fields:
        raise ValueError(f"{path}: no time_s column (columns: {fields})")
    rail_cols = {f[: -len("_mw")]: f for f in fields if f.endswith("_mw")}
    if not rail_cols:
        raise ValueError(f"{path}: no <RAIL>_mw power columns")
    chosen = select_total_rails(list(rail_cols), rails)
    times, power = [], []
    for n, row in enumerate(reader, start=2):
        row = {k.strip(): v for k, v in row.items() if k is not None}
        try:
            times.append(float(row["time_s"]))
            power.append(sum(float(row[rail_cols[r]]) for r in chosen) / 1000.0)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: bad row {n}: {exc}") from exc
    return PowerTrace(times, power), chosen


class ReplayMeter:
    """Plays a power trace back as a counter meter with power readings.

    Args:
        config: Supplies `replay_trace`, `replay_loop` and `jetson_rails`.
        clock: Monotonic clock; tests pass their own for deterministic readings.

    """

    source: EnergySource = "replayed"
    update_period_s: float = 0.0

    def __init__(self, config: EnergyConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = config.replay_trace
        self.loop = config.replay_loop
        self.rails_setting = tuple(config.jetson_rails)
        self.name = "replay"
        self._clock = clock
        self._trace: PowerTrace | None = None
        self._rails: list[str] = []
        self._t0: float | None = None

    def _open(self) -> PowerTrace:
        if self._trace is None:
            if not self.path:
                raise MeterError("no trace given (--replay-trace FILE.csv)")
            try:
                self._trace, self._rails = load_trace(self.path, self.rails_setting)
            except (OSError, ValueError) as exc:
                raise MeterError(f"cannot load replay trace: {exc}") from exc
            self.name = f"replay:{Path(self.path).stem}:" + "+".join(self._rails)
        return self._trace

    def is_available(self) -> Availability:
        """Load and validate the trace."""
        try:
            trace = self._open()
        except MeterError as exc:
            return Availability.no(str(exc))
        return Availability.yes(
            f"{len(trace.t)} rows, {trace.duration_s:.1f} s, {trace.total_j:.1f} J per pass, "
            f"rails {self._rails}"
        )

    def read(self) -> MeterReading:
        """Trace power at the current trace time and the energy replayed since the first read."""
        trace = self._open()
        now = self._clock()
        if self._t0 is None:
            self._t0 = now
        elapsed = max(0.0, now - self._t0)
        if self.loop:
            passes, pos = divmod(elapsed, trace.duration_s)
            energy = passes * trace.total_j + trace.energy_at(pos)
            power = trace.power_at(pos)
        elif elapsed <= trace.duration_s:
            energy, power = trace.energy_at(elapsed), trace.power_at(elapsed)
        else:
            power = trace.p[-1]
            energy = trace.total_j + (elapsed - trace.duration_s) * power
        return MeterReading(t_s=now, energy_j=energy, power_w=power)

    def describe(self) -> dict[str, object]:
        """Trace file, rails, length and energy per pass."""
        facts: dict[str, object] = {
            "name": self.name,
            "source": self.source,
            "kind": "counter",
            "trace": self.path,
            "loop": self.loop,
        }
        if self._trace is not None:
            facts.update(
                rails_summed=self._rails, duration_s=self._trace.duration_s, pass_j=self._trace.total_j
            )
        return facts

    def close(self) -> None:
        """Nothing held open."""
