"""Background sampling of a meter into a ring buffer that any time window can be integrated over.

Each sample is (t_s, power_w, energy_j):

- counter meters (readings carry `energy_j`): energy is the meter's cumulative value; power
  is the meter's own reading when it gives one, else the average since the previous sample.
- power meters (only `power_w`): energy is accumulated here with the trapezoid rule.

`energy_at(t)` evaluates the cumulative energy at any time: counter meters interpolate the
counter linearly between samples; power meters integrate the piecewise-linear power exactly
(trapezoid with the power interpolated at the window edges). Outside the buffer it
extrapolates with the nearest power. A window's energy is `energy_at(t1) - energy_at(t0)`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from joulecap.runtime.energy.base import Meter, MeterReading

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowEnergy:
    """Energy of one time window.

    Attributes:
        energy_j: Energy in the window.
        samples: Meter samples taken inside the window (edges included).
        interpolated: True when the figure does not come from the meter's own resolution
            (window shorter than its update period).
        note: How an interpolated figure was made, else empty.
        method: `meter` (the meter's own resolution), `power` (integrated from power readings
            inside a window shorter than the update period) or `scaled` (one update period
            around the window, scaled by duration).

    """

    energy_j: float
    samples: int
    interpolated: bool = False
    note: str = ""
    method: str = "meter"


class _Ring:
    """Time-ordered samples in preallocated arrays, oldest dropped past `capacity`.

    Storage is 2 x capacity so the live rows stay contiguous (searchsorted works on a
    slice); when the end is reached the live rows are moved to the front (amortised O(1)).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._t = np.empty(2 * capacity)
        self._p = np.empty(2 * capacity)
        self._e = np.empty(2 * capacity)
        self._start = 0
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, t: float, p: float, e: float) -> None:
        if self._n == self.capacity:
            self._start += 1
            self._n -= 1
        end = self._start + self._n
        if end == 2 * self.capacity:
            for arr in (self._t, self._p, self._e):
                arr[: self._n] = arr[self._start : end]
            self._start, end = 0, self._n
        self._t[end], self._p[end], self._e[end] = t, p, e
        self._n += 1

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s, e = self._start, self._start + self._n
        return self._t[s:e], self._p[s:e], self._e[s:e]

    def last(self) -> tuple[float, float, float]:
        i = self._start + self._n - 1
        return float(self._t[i]), float(self._p[i]), float(self._e[i])

    def set_last_power(self, power: float) -> None:
        self._p[self._start + self._n - 1] = power


class Sampler:
    """Reads `meter` on a background thread at `sample_hz` and keeps `history_s` of samples.

    Reads (background or `sample_now`) are serialised, so samples stay in time order and
    meters need not be thread-safe. A failed read is logged once per message, counted, and
    remembered with its time so reports covering it can fall back.

    Args:
        meter: The meter to read.
        sample_hz: Readings per second.
        history_s: Seconds of samples kept.

    """

    def __init__(self, meter: Meter, *, sample_hz: float, history_s: float = 600.0) -> None:
        if not (0.0 < sample_hz <= 1000.0):
            raise ValueError(f"sample_hz must be in (0, 1000], got {sample_hz}")
        self.meter = meter
        self.period_s = 1.0 / sample_hz
        self._ring = _Ring(max(16, math.ceil(history_s * sample_hz) + 16))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prev: MeterReading | None = None
        self._counter: bool | None = None
        self.reports_power = False
        """True once the meter returned a power value of its own (not derived from a counter)."""
        self._energy_offset = 0.0
        self._failures: deque[tuple[float, str]] = deque(maxlen=256)
        self._logged: set[str] = set()
        self.reads = 0
        self.failed_reads = 0

    # ------------------------------------------------------------------ sampling
    def start(self) -> None:
        """Start the background thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="joulecap-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread and wait for it."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)

    @property
    def running(self) -> bool:
        """Whether the background thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        next_t = time.monotonic()
        while True:
            with contextlib.suppress(Exception):  # recorded in _failures; keep sampling
                self.sample_now()
            next_t += self.period_s
            delay = next_t - time.monotonic()
            if delay < 0:  # fell behind (slow meter, suspended process): do not burst
                next_t, delay = time.monotonic(), 0.0
            if self._stop.wait(delay):
                return

    def sample_now(self) -> MeterReading:
        """Take one reading now and append it.

        Raises:
            Exception: Whatever the meter raised (also recorded as a failure).

        """
        with self._lock:
            try:
                reading = self.meter.read()
            except Exception as exc:
                self.failed_reads += 1
                msg = f"{type(exc).__name__}: {exc}"
                self._failures.append((time.monotonic(), msg))
                if msg not in self._logged and len(self._logged) < 32:
                    self._logged.add(msg)
                    log.warning("meter %s read failed: %s", getattr(self.meter, "name", "?"), msg)
                raise
            self.reads += 1
            self._append(reading)
            return reading

    def _append(self, r: MeterReading) -> None:
        prev = self._prev
        if prev is not None and r.t_s <= prev.t_s:
            return  # a clock that did not move adds nothing
        if self._counter is None:
            self._counter = r.energy_j is not None
        if r.power_w is not None:
            self.reports_power = True
        if self._counter:
            if r.energy_j is None:
                raise ValueError("counter meter returned a reading without energy_j")
            energy = r.energy_j + self._energy_offset
            if prev is not None and prev.energy_j is not None and r.energy_j < prev.energy_j:
                # Counter reset (driver reload): continue from where it was, no energy jump.
                self._energy_offset += prev.energy_j - r.energy_j
                energy = r.energy_j + self._energy_offset
            if r.power_w is not None:
                power = r.power_w
            elif prev is not None and prev.energy_j is not None:
                power = max(0.0, (r.energy_j - prev.energy_j) / (r.t_s - prev.t_s))
            else:
                power = math.nan  # first sample: filled in by the next one
        else:
            if r.power_w is None:
                raise ValueError("power meter returned a reading without power_w")
            power = r.power_w
            if len(self._ring):
                t_last, p_last, e_last = self._ring.last()
                energy = e_last + (r.t_s - t_last) * (p_last + power) / 2.0
            else:
                energy = 0.0
        if len(self._ring) == 1 and math.isnan(self._ring.last()[1]):
            self._ring.set_last_power(power)  # the first counter sample had no power yet
        self._ring.append(r.t_s, power, energy)
        self._prev = r

    # ------------------------------------------------------------------ queries
    def failures_between(self, t0_s: float, t1_s: float) -> list[str]:
        """Messages of reads that failed in [t0_s, t1_s]."""
        with self._lock:
            return [m for t, m in self._failures if t0_s <= t <= t1_s]

    def latest(self) -> tuple[float, float, float] | None:
        """Return the newest sample (t_s, power_w, energy_j), or None."""
        with self._lock:
            return self._ring.last() if len(self._ring) else None

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def counter(self) -> bool | None:
        """True for a counter meter, False for a power meter, None before the first sample."""
        return self._counter

    def oldest_t(self) -> float | None:
        """Return the time of the oldest sample kept, or None."""
        with self._lock:
            return float(self._ring.view()[0][0]) if len(self._ring) else None

    def energy_at(self, t_s: float) -> float:
        """Cumulative energy at `t_s` on the buffer's own scale (see module docstring)."""
        with self._lock:
            t, p, e = self._ring.view()
            return _energy_at(t, p, e, t_s, counter=bool(self._counter))

    def integrate(self, t0_s: float, t1_s: float) -> WindowEnergy:
        """Energy in [t0_s, t1_s] at the buffer's resolution (no short-window handling)."""
        if t1_s <= t0_s:
            return WindowEnergy(0.0, 0)
        with self._lock:
            t, p, e = self._ring.view()
            if len(t) == 0:
                raise ValueError("no samples yet")
            counter = bool(self._counter)
            # Each edge's index is searched once and shared by its energy and the sample count
            # (a report splits every engine step's window: this runs many times per request).
            r1 = int(t.searchsorted(t1_s, side="right"))
            r0 = int(t.searchsorted(t0_s, side="right"))
            e1 = _energy_at_index(t, p, e, t1_s, r1, counter)
            e0 = _energy_at_index(t, p, e, t0_s, r0, counter)
            # Sample times strictly increase: the left index of t0 is the right one less an equal.
            inside = r1 - (r0 - 1 if r0 > 0 and t[r0 - 1] == t0_s else r0)
        return WindowEnergy(max(0.0, e1 - e0), inside)

    def mean_power(self, t0_s: float, t1_s: float) -> tuple[float, int]:
        """Time-averaged sampled power over [t0_s, t1_s] (trapezoid of the power samples).

        Used for windows shorter than a counter's update period: the counter has not moved,
        but the power readings taken beside it have.
        """
        with self._lock:
            t, p, _ = self._ring.view()
            if len(t) == 0:
                raise ValueError("no samples yet")
            i0 = int(np.searchsorted(t, t0_s, side="left"))
            i1 = int(np.searchsorted(t, t1_s, side="right"))
            edges = np.interp([t0_s, t1_s], t, p)  # flat outside the buffer
            if t1_s <= t0_s:
                return float(edges[0]), i1 - i0
            xs = np.concatenate(([t0_s], t[i0:i1], [t1_s]))
            ps = np.concatenate(([edges[0]], p[i0:i1], [edges[1]]))
        area = float(np.sum((xs[1:] - xs[:-1]) * (ps[1:] + ps[:-1]) / 2.0))
        return area / (t1_s - t0_s), i1 - i0


def _energy_at(t: np.ndarray, p: np.ndarray, e: np.ndarray, x: float, *, counter: bool) -> float:
    if len(t) == 0:
        raise ValueError("no samples yet")
    return _energy_at_index(t, p, e, x, int(t.searchsorted(x, side="right")), counter)


def _energy_at_index(t: np.ndarray, p: np.ndarray, e: np.ndarray, x: float, r: int, counter: bool) -> float:
    """Energy counter at `x`, given `r = searchsorted(t, x, side="right")`.

    Interpolated between the samples around `x` (linearly for a counter, else by the trapezoid
    of the interpolated power), extended flat in power outside the buffer. On Python floats
    rather than NumPy scalars: cheaper per operation, the same IEEE arithmetic.
    """
    t_first, t_last = float(t[0]), float(t[-1])
    if x <= t_first:
        return float(e[0]) - (t_first - x) * _finite(p[0])
    if x >= t_last:
        return float(e[-1]) + (x - t_last) * _finite(p[-1])
    i = r - 1  # t[i] <= x < t[i+1]
    t_i, t_j = float(t[i]), float(t[i + 1])
    e_i, e_j = float(e[i]), float(e[i + 1])
    frac = (x - t_i) / (t_j - t_i)
    if counter:
        return e_i + frac * (e_j - e_i)
    p_i, p_j = float(p[i]), float(p[i + 1])
    px = p_i + frac * (p_j - p_i)
    return e_i + (x - t_i) * (p_i + px) / 2.0


def _finite(x: float) -> float:
    return 0.0 if math.isnan(x) else float(x)
