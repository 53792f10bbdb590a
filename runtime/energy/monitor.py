"""Per-request energy reports from a sampled meter: phases, idle share, interpolation, fallback.

`EnergyMonitor` owns the background `Sampler`. The engine marks phase boundaries
(`PhaseTimes`); `report()` integrates prefill (start..first token) and decode (first
token..end) over the samples, adds the idle share and says where the figure came from.

- **Idle baseline**: measured for `idle_baseline_s` at `start()`, then refreshed from idle
  gaps between requests that last at least `idle_refresh_s` (exponential average). Gaps are
  known from reported windows and from `live_energy_j` calls of requests still running.
- **Short windows**: a window shorter than the meter's `update_period_s` (NVML's counter
  moves about every 100 ms) is integrated from the power readings taken beside the counter;
  when the meter gives none, the request's total is split by the predictor's prefill/decode
  ratio. Either way `interpolated=True` and `note` says how.
- **Read failures**: if a read fails at or during a request, the report is an estimate
  (`source="estimated"`; the predictor's figures, else the idle power x duration) with the
  reason in `note`. `report()` never raises.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import math
import operator
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from joulecap.runtime.energy.base import Meter
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.quality import (
    NOTE_FROM_POWER,
    NOTE_SCALED,
    MeasurementQuality,
    MeterKind,
    measurement_quality,
)
from joulecap.runtime.energy.sampler import Sampler, WindowEnergy
from joulecap.runtime.types import EnergyReport, PhaseTimes

log = logging.getLogger(__name__)

T = TypeVar("T")

IDLE_EMA_ALPHA = 0.5
"""Weight of a newly measured idle gap in the idle baseline."""

FRESH_READ_S = 0.002
"""Meters that update at least this often (estimate, RAPL, Jetson sysfs, replay) are read afresh
at a request's start and on each governor poll when the newest sample is older than this: with
10 Hz background sampling a 50 ms request would otherwise be integrated from samples taken
outside it, and the governor would fly on the predictor alone."""

_MAX_INTERVALS = 1024


class EnergyMonitor:
    """Samples a meter in the background and turns time windows into energy reports.

    Args:
        meter: The meter to sample (already chosen by `create_meter`).
        config: Sampling rate, idle baseline and estimate settings.

    """

    def __init__(self, meter: Meter, config: EnergyConfig) -> None:
        self.meter = meter
        self.config = config
        self.sampler = Sampler(meter, sample_hz=config.sample_hz, history_s=config.sample_history_s)
        self._lock = threading.Lock()
        self._idle_w = 0.0
        self._idle_measured = False
        self._idle_until = -math.inf
        self._busy: list[tuple[float, float]] = []
        self._live: dict[float, float] = {}
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start sampling and measure the idle baseline (blocks `idle_baseline_s`)."""
        if self._started:
            return
        self._started = True
        try:
            first = self.sampler.sample_now()
        except Exception as exc:
            log.warning(
                "meter %s failed its first read (%s); reports will be estimates", self.meter.name, exc
            )
            self.sampler.start()
            return
        with self._lock:
            self._idle_until = first.t_s  # nothing before the first sample can be an idle gap
        self.sampler.start()
        if self.config.idle_baseline_s <= 0:
            return
        time.sleep(self.config.idle_baseline_s)
        try:
            last = self.sampler.sample_now()
            window = self.sampler.integrate(first.t_s, last.t_s)
        except Exception as exc:
            log.warning("idle baseline not measured: %s", exc)
            return
        with self._lock:
            self._idle_w = window.energy_j / (last.t_s - first.t_s)
            self._idle_measured = True
            self._idle_until = last.t_s
        log.info("idle baseline %.2f W on %s", self._idle_w, self.meter.name)

    def stop(self) -> None:
        """Stop the sampler thread (the meter itself is closed by its owner)."""
        self.sampler.stop()
        self._started = False

    @property
    def idle_power_w(self) -> float:
        """Current idle baseline in watts (0 until measured)."""
        return self._idle_w

    # ------------------------------------------------------------------ windows
    def energy_between(self, t0_s: float, t1_s: float) -> WindowEnergy:
        """Energy between two `time.monotonic()` marks.

        Raises:
            Exception: The meter failed when a fresh sample was needed, or there are none.

        """
        if t1_s <= t0_s:
            return WindowEnergy(0.0, 0)
        latest = self.sampler.latest()
        if latest is None or latest[0] < t1_s:
            self.sampler.sample_now()
        period = float(getattr(self.meter, "update_period_s", 0.0) or 0.0)
        duration = t1_s - t0_s
        if period <= 0 or duration >= period:
            return self.sampler.integrate(t0_s, t1_s)
        why = f"window {duration * 1e3:.0f} ms < the meter's {period * 1e3:.0f} ms update period"
        if self.sampler.reports_power:
            mean_w, n = self.sampler.mean_power(t0_s, t1_s)
            if math.isfinite(mean_w):
                return WindowEnergy(mean_w * duration, n, True, f"{why}: {NOTE_FROM_POWER}", "power")
        # No power readings: take one update period around the window and scale it down.
        mid = (t0_s + t1_s) / 2.0
        wide = self.sampler.integrate(mid - period / 2.0, mid + period / 2.0)
        inside = self.sampler.integrate(t0_s, t1_s).samples
        return WindowEnergy(
            wide.energy_j * duration / period, inside, True, f"{why}: {NOTE_SCALED}", "scaled"
        )

    @property
    def reads_fresh(self) -> bool:
        """Whether `live_energy_j` reads the meter afresh (it updates at least every `FRESH_READ_S`)."""
        return float(getattr(self.meter, "update_period_s", 0.0) or 0.0) <= FRESH_READ_S

    def fresh_sample(self) -> None:
        """Read the meter now if it updates fast (`FRESH_READ_S`) and the newest sample is stale.

        Never raises: a failed read is recorded by the sampler and the report falls back.
        """
        if not self.reads_fresh:
            return
        latest = self.sampler.latest()
        if latest is not None and time.monotonic() - latest[0] <= FRESH_READ_S:
            return
        # A failed read is recorded by the sampler; reports fall back on their own.
        with contextlib.suppress(Exception):
            self.sampler.sample_now()

    def live_energy_j(self, since_s: float) -> float:
        """Energy since `since_s` from the samples so far (extrapolated to now); cheap.

        Fast meters are read first when their newest sample is stale (`fresh_sample`).

        The governor calls this while a request runs; the call also marks the time since
        `since_s` as busy so the idle baseline is not refreshed from it.
        """
        self.fresh_sample()
        now = time.monotonic()
        with self._lock:
            self._live[since_s] = now
            if len(self._live) > _MAX_INTERVALS:
                self._live.pop(next(iter(self._live)))
        try:
            return max(0.0, self.sampler.energy_at(now) - self.sampler.energy_at(since_s))
        except ValueError:  # no samples yet
            return 0.0

    # ------------------------------------------------------------------ reports
    def measure(self, work: Callable[[], T]) -> tuple[T, EnergyReport]:
        """Run `work` and report the energy of its window as one phase (edges read fresh).

        Used for work that happens before a request's run, such as image preprocessing and the
        vision encoder in `Engine.prepare`.
        """
        self.fresh_sample()
        start_s = time.monotonic()
        value = work()
        self.fresh_sample()
        end_s = time.monotonic()
        window = PhaseTimes(start_s, end_s, end_s)
        return value, self.report(window, predicted_prefill_j=0.0, predicted_decode_j=0.0)

    def report(
        self, times: PhaseTimes, *, predicted_prefill_j: float = 0.0, predicted_decode_j: float = 0.0
    ) -> EnergyReport:
        """Energy report of one request (never raises).

        Args:
            times: Start, first-token and end marks from the engine.
            predicted_prefill_j: The predictor's prefill energy for the request as run (used to
                split short windows and as the fallback estimate); 0 if unknown.
            predicted_decode_j: Same for decode.

        """
        start, end = times.start_s, max(times.start_s, times.end_s)
        first = min(max(times.first_token_s, start), end)
        pp, pd = max(0.0, predicted_prefill_j), max(0.0, predicted_decode_j)
        try:
            return self._report(start, first, end, pp, pd)
        except Exception as exc:  # a bug here must cost accuracy, never the response
            log.exception("energy report failed")
            return self._fallback(start, first, end, pp, pd, f"report failed: {type(exc).__name__}: {exc}")

    def _report(self, start: float, first: float, end: float, pp: float, pd: float) -> EnergyReport:
        try:
            self.sampler.sample_now()
        except Exception as exc:
            return self._fallback(
                start, first, end, pp, pd, f"meter read failed at the end of the request: {exc}"
            )
        failures = self.sampler.failures_between(start, end)
        if failures:
            return self._fallback(
                start,
                first,
                end,
                pp,
                pd,
                f"{len(failures)} meter read(s) failed during the request: {failures[-1]}",
            )
        try:
            pre = self.energy_between(start, first)
            dec = self.energy_between(first, end)
            total = self.energy_between(start, end)
        except Exception as exc:
            return self._fallback(start, first, end, pp, pd, f"window integration failed: {exc}")
        prefill_j, decode_j = pre.energy_j, dec.energy_j
        notes = [w.note for w in (pre, dec) if w.note]
        interpolated = pre.interpolated or dec.interpolated or total.interpolated
        if pre.interpolated or dec.interpolated:
            from_power = all(w.method == "power" for w in (pre, dec) if w.interpolated)
            if not from_power and pp + pd > 0:
                prefill_j = total.energy_j * pp / (pp + pd)
                decode_j = total.energy_j - prefill_j
                notes.append("prefill/decode split by the predictor's ratio")
            elif not total.interpolated and prefill_j + decode_j > 0:
                # Keep the meter's own total over the whole request; interpolate only the split.
                scale = total.energy_j / (prefill_j + decode_j)
                prefill_j, decode_j = prefill_j * scale, total.energy_j - prefill_j * scale
        duration = end - start
        total_j = prefill_j + decode_j
        if self.meter.source == "measured" and duration > 0 and not total_j > 0:
            # Powered hardware never draws 0 W: a counter that did not move over a real window
            # is a reading the device does not support (a vGPU, a MIG slice), not a free request.
            return self._fallback(
                start,
                first,
                end,
                pp,
                pd,
                f"meter reported 0 J over {duration * 1e3:.1f} ms (a reading this hardware does not support)",
            )
        self._after_request(start, end)
        idle_j = min(self._idle_w * duration, total_j)
        return EnergyReport(
            total_j=total_j,
            prefill_j=prefill_j,
            decode_j=decode_j,
            idle_j=idle_j,
            duration_s=duration,
            source=self.meter.source,
            meter=self.meter.name,
            samples=total.samples,
            interpolated=interpolated,
            note="; ".join(dict.fromkeys(notes)),
        )

    def _fallback(
        self, start: float, first: float, end: float, pp: float, pd: float, why: str
    ) -> EnergyReport:
        if pp + pd > 0:
            prefill_j, decode_j, how = pp, pd, "predictor"
        else:
            power = self._idle_w if self._idle_measured and self._idle_w > 0 else self.config.estimate_base_w
            which = "idle power" if self._idle_measured and self._idle_w > 0 else "estimate_base_w"
            prefill_j, decode_j, how = (
                power * (first - start),
                power * (end - first),
                f"{which} {power:.2f} W",
            )
        log.warning("energy of a request estimated (%s): %s", how, why)
        self._after_request(start, end)
        total_j = prefill_j + decode_j
        return EnergyReport(
            total_j=total_j,
            prefill_j=prefill_j,
            decode_j=decode_j,
            idle_j=min(self._idle_w * (end - start), total_j),
            duration_s=end - start,
            source="estimated",
            meter="estimate:" + ("predictor" if how == "predictor" else "power"),
            samples=0,
            interpolated=False,
            note=f"{self.meter.name}: {why}; estimated from {how}",
        )

    # ------------------------------------------------------------------ idle baseline
    def _after_request(self, start: float, end: float) -> None:
        try:
            self._refresh_idle(start)
        except Exception as exc:  # a refresh problem must never break a report
            log.debug("idle refresh skipped: %s", exc)
        with self._lock:
            self._busy.append((start, end))
            if len(self._busy) > _MAX_INTERVALS:
                del self._busy[: len(self._busy) - _MAX_INTERVALS]

    def _idle_gap(self, before_s: float) -> tuple[float, float]:
        """Return the idle gap that ends at the busy block containing `before_s`."""
        oldest = self.sampler.oldest_t()
        with self._lock:
            intervals = [*self._busy, *self._live.items()]
            # Nothing before the first sample kept (or the last refresh) can be an idle gap.
            floor = max(self._idle_until, oldest if oldest is not None else math.inf)
        # Walk back over the busy intervals (a, b] that hold the gap's end, to the start of the
        # busy stretch they chain into. Taken by falling start, one pass does it: an interval
        # passed over starts at or after the gap's end so far, and the end only moves earlier.
        # (Repeated passes in arrival order cost O(n) passes on a server that is never idle.)
        ordered = sorted(intervals)
        gap_end = before_s
        for a, b in reversed(ordered):
            if a < gap_end <= b:
                gap_end = a
        # The gap starts at the latest end at or before its end. No interval holds `gap_end`, so
        # those that start before it end before it, and one that starts at or after it ends at
        # or before it only when it is (gap_end, gap_end): a prefix of `ordered`, plus that one.
        k = bisect.bisect_left(ordered, (gap_end, -math.inf))
        start = max(floor, max(map(operator.itemgetter(1), itertools.islice(ordered, k)), default=floor))
        if k < len(ordered) and ordered[k] == (gap_end, gap_end):
            start = max(start, gap_end)
        return start, gap_end

    def _refresh_idle(self, request_start: float) -> None:
        if self.config.idle_refresh_s <= 0:
            return
        gap_start, gap_end = self._idle_gap(request_start)
        guard = max(
            0.25, 2.0 * float(getattr(self.meter, "update_period_s", 0.0)), 2.0 * self.sampler.period_s
        )
        t0, t1 = gap_start + guard, gap_end - guard
        if not math.isfinite(t0) or t1 - t0 < self.config.idle_refresh_s:
            return
        window = self.sampler.integrate(t0, t1)
        if window.samples < 2:
            return
        measured = window.energy_j / (t1 - t0)
        with self._lock:
            old = self._idle_w
            self._idle_w = (
                measured
                if not self._idle_measured
                else (1 - IDLE_EMA_ALPHA) * old + IDLE_EMA_ALPHA * measured
            )
            self._idle_measured = True
            self._idle_until = gap_end
        log.debug("idle baseline %.2f W -> %.2f W (gap of %.1f s)", old, self._idle_w, t1 - t0)

    def quality(self, report: EnergyReport) -> MeasurementQuality:
        """Measurement quality of a report this monitor produced (for the ledger row).

        A fallback report (the meter failed) is an estimate whatever the meter is.
        """
        fallback = report.meter.startswith("estimate:") and report.meter != self.meter.name
        kind = None if fallback else self.meter_kind
        return measurement_quality(
            report,
            meter_kind=kind,
            sample_period_s=self.sampler.period_s,
            meter_update_period_s=float(getattr(self.meter, "update_period_s", 0.0) or 0.0),
        )

    @property
    def meter_kind(self) -> MeterKind | None:
        """`counter` or `power` once the first sample told which (None before any sample)."""
        counter = self.sampler.counter
        return None if counter is None else ("counter" if counter else "power")

    def describe(self) -> dict[str, object]:
        """Meter facts plus sampling state, for `/v1/energy/meter`-style endpoints."""
        return {
            **self.meter.describe(),
            "sample_hz": self.config.sample_hz,
            "idle_power_w": self._idle_w,
            "samples": len(self.sampler),
            "reads": self.sampler.reads,
            "failed_reads": self.sampler.failed_reads,
        }
