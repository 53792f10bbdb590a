"""Energy accounting of one request: its encode, its live energy for the governor, its report.

Two kinds, chosen once at start-up from the engine:

- `SingleAccounting`: the engine runs one request at a time (transformers): the request owns every
  joule of its windows.
- `BatchedAccounting`: the engine batches (vLLM) and records token work in a `WorkLog`; each
  measured window is split among the requests that worked in it by token work, at the
  predictor's per-token costs (../shared/DESIGN.md, "Energy semantics"). An encode that
  overlapped other requests' work is in their windows already, so it is charged only when the
  engine was idle throughout.

Every report carries the three parts apart: `encode_j` (measured before planning), `prefill_j`
(the LM prefill) and `decode_j`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from joulecap.runtime.energy.attribution import TokenWork
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.energy.sampler import WindowEnergy
from joulecap.runtime.energy.worklog import Window, WorkLog, attribute, split_window
from joulecap.runtime.types import EnergyReport, PhaseTimes, Prediction

T = TypeVar("T")


class EncodeWindowShare(Protocol):
    """A request's part of a batched encode's window (an engine's `encode_share`)."""

    t0_s: float
    t1_s: float
    fraction: float
    batch_size: int
    overlapped: bool


_MAX_MEASURED = 16384
"""Window figures `BatchedAccounting.window_energy` remembers (a few minutes of engine steps)."""

TokenCosts = Callable[[], tuple[float, float]]
"""Returns the current per-token (prefill, decode) joules (the predictor's coefficients)."""


class EncodeFailed(Exception):
    """`Engine.prepare` raised; carries the energy it spent so that it can be recorded.

    Attributes:
        cause: The original exception.
        energy: The measured energy of the failed encode (None when not charged to the request).

    """

    def __init__(self, cause: BaseException, energy: EnergyReport | None) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.energy = energy


def _joined(a: EnergyReport, b: EnergyReport, encode_j: float) -> EnergyReport:
    """`a` and `b` as one window's report (`a`'s meter and source), with the given `encode_j`."""
    return dataclasses.replace(
        a,
        total_j=a.total_j + b.total_j,
        encode_j=encode_j,
        idle_j=a.idle_j + b.idle_j,
        duration_s=a.duration_s + b.duration_s,
        samples=a.samples + b.samples,
        interpolated=a.interpolated or b.interpolated,
        note="; ".join(n for n in (a.note, b.note) if n),
    )


def with_encode(energy: EnergyReport, encode: EnergyReport | None) -> EnergyReport:
    """`energy` (of the LM run) with the encode's window added as its `encode_j`."""
    if encode is None:
        return energy
    return _joined(energy, encode, encode_j=encode.total_j)


def added_encode(first: EnergyReport | None, more: EnergyReport | None) -> EnergyReport | None:
    """Two encode windows of one request as one encode report (None only when both are None)."""
    if first is None or more is None:
        return first or more
    return _joined(first, more, encode_j=first.total_j + more.total_j)


class RunMeter(ABC):
    """One running request's energy, from the start of its run (its encode included)."""

    measurement_is_current: bool = False
    """`energy_so_far_j` is exact at each call (no meter lag for the governor to cover)."""

    def __init__(self, monitor: EnergyMonitor, request_id: str, encode: EnergyReport | None) -> None:
        self.monitor = monitor
        self.request_id = request_id
        self.encode = encode
        self.encode_j = 0.0 if encode is None else encode.total_j
        monitor.fresh_sample()  # an exact counter value at the window's start
        self.start_s = time.monotonic()

    @abstractmethod
    def energy_so_far_j(self) -> float:
        """The encode plus the run's energy so far."""

    @abstractmethod
    def run_report(self, times: PhaseTimes, predicted: Prediction) -> EnergyReport:
        """The LM run's report (without the encode)."""

    def report(self, times: PhaseTimes, predicted: Prediction) -> EnergyReport:
        """The request's report: the encode and the run."""
        return with_encode(self.run_report(times, predicted), self.encode)

    def failure_report(self) -> EnergyReport:
        """The energy spent until now, for a run that failed."""
        end_s = time.monotonic()
        return self.report(PhaseTimes(self.start_s, end_s, end_s), Prediction(0.0, 0.0, 0.0))


class Accounting(ABC):
    """Makes `RunMeter`s and measures encodes for one engine (single or batched)."""

    def __init__(self, monitor: EnergyMonitor) -> None:
        self.monitor = monitor

    def measure_encode(self, work: Callable[[], T]) -> tuple[T, EnergyReport | None]:
        """Run `work` (the engine's prepare) and measure it.

        Returns:
            Its value and the encode energy charged to the request (None when not charged).

        Raises:
            EncodeFailed: `work` raised; the energy it spent is attached.

        """
        self.monitor.fresh_sample()
        t0_s = time.monotonic()
        try:
            value = work()
        except Exception as exc:
            raise EncodeFailed(exc, self._encode_report(t0_s)) from exc
        return value, self._encode_report(t0_s)

    def _encode_report(self, t0_s: float) -> EnergyReport | None:
        self.monitor.fresh_sample()
        end_s = time.monotonic()
        window = self.monitor.report(PhaseTimes(t0_s, end_s, end_s))
        # One window, all of it encode: no LM prefill or decode ran in it.
        return dataclasses.replace(window, encode_j=window.total_j, prefill_j=0.0, decode_j=0.0)

    def share_of(self, share: EncodeWindowShare | None) -> EnergyReport | None:
        """A request's share of a batched encode's window (None when it overlapped other work).

        The batch's window is measured once; each request's report is that window times its
        fraction, so the shares of a batch sum to the meter's reading. A window that overlapped
        other work is already in their windows and is charged to nobody here.
        """
        if share is None or share.overlapped:
            return None
        window = self.monitor.report(PhaseTimes(share.t0_s, share.t1_s, share.t1_s))
        f = share.fraction
        note = f"encode batch of {share.batch_size}: share {f:.3f} by visual tokens"
        return dataclasses.replace(
            window,
            total_j=window.total_j * f,
            encode_j=window.total_j * f,
            prefill_j=0.0,
            decode_j=0.0,
            idle_j=window.idle_j * f,
            note="; ".join(filter(None, [window.note, note])),
        )

    @abstractmethod
    def start(self, request_id: str, encode: EnergyReport | None) -> RunMeter:
        """Begin measuring a request's run."""


class _SingleRun(RunMeter):
    def energy_so_far_j(self) -> float:
        return self.encode_j + self.monitor.live_energy_j(self.start_s)

    def run_report(self, times: PhaseTimes, predicted: Prediction) -> EnergyReport:
        return self.monitor.report(
            times, predicted_prefill_j=predicted.prefill_j, predicted_decode_j=predicted.decode_j
        )


class SingleAccounting(Accounting):
    """One request at a time: each measured window is the request's."""

    def start(self, request_id: str, encode: EnergyReport | None) -> RunMeter:
        """Begin measuring a request's run."""
        run = _SingleRun(self.monitor, request_id, encode)
        run.measurement_is_current = self.monitor.reads_fresh
        return run


class _BatchedRun(RunMeter):
    def __init__(
        self,
        monitor: EnergyMonitor,
        request_id: str,
        encode: EnergyReport | None,
        accounting: BatchedAccounting,
    ) -> None:
        super().__init__(monitor, request_id, encode)
        self.log = accounting.log
        self.window_energy = accounting.window_energy
        self.window_shares = accounting.window_shares
        # The costs only weigh one request's tokens against another's: fixed for the whole run.
        self.prefill_cost, self.decode_cost = accounting.costs()

    def energy_so_far_j(self) -> float:
        fraction = self.log.live_fraction(
            self.request_id, prefill_cost=self.prefill_cost, decode_cost=self.decode_cost
        )
        return self.encode_j + self.monitor.live_energy_j(self.start_s) * fraction

    def run_report(self, times: PhaseTimes, predicted: Prediction) -> EnergyReport:
        # The monitor's whole-window report first: it keeps the idle-baseline bookkeeping and its
        # fallbacks; when that is an estimate, or the log has no work for the request, it stands.
        base = self.monitor.report(
            times, predicted_prefill_j=predicted.prefill_j, predicted_decode_j=predicted.decode_j
        )
        if base.meter != self.monitor.meter.name:
            return base  # the monitor fell back to an estimate: nothing measured to split
        try:
            share = attribute(
                self.request_id,
                self.log.windows_of(self.request_id, times.start_s - 1.0, times.end_s),
                self.window_energy,
                prefill_cost=self.prefill_cost,
                decode_cost=self.decode_cost,
                idle_power_w=self.monitor.idle_power_w,
                split=self.window_shares,
            )
        except Exception as exc:  # accuracy may suffer, the response must not
            return dataclasses.replace(
                base, note="; ".join(filter(None, [base.note, f"batch split failed: {exc}"]))
            )
        if share.windows == 0:
            return base
        note = (
            f"split by token work: {share.windows} engine step window(s), "
            f"{share.shared_windows} shared with concurrent requests"
        )
        return dataclasses.replace(
            base,
            total_j=share.total_j,
            prefill_j=share.prefill_j,
            decode_j=share.total_j - share.prefill_j,
            idle_j=share.idle_j,
            interpolated=base.interpolated or share.interpolated,
            note="; ".join(filter(None, [base.note, note])),
        )


class BatchedAccounting(Accounting):
    """Concurrent requests share windows: each is split by token work from the engine's `WorkLog`.

    Args:
        monitor: The energy monitor.
        log: The engine's token-work log.
        token_costs: Current per-token (prefill, decode) joules; only their ratio matters.

    """

    def __init__(self, monitor: EnergyMonitor, log: WorkLog, token_costs: TokenCosts) -> None:
        super().__init__(monitor)
        self.log = log
        self._token_costs = token_costs
        # Concurrent requests share their step windows: each window is measured once and its
        # figure reused by every request that worked in it (`window_energy`), and so is its split
        # (`window_shares`): under batching every request of a window would otherwise redo it.
        self._measured: dict[tuple[float, float], WindowEnergy] = {}
        self._split: dict[
            tuple[float, float, float, float, float], tuple[Mapping[str, TokenWork], Mapping[str, float]]
        ] = {}
        self._measured_lock = threading.Lock()

    def window_energy(self, t0_s: float, t1_s: float) -> WindowEnergy:
        """`monitor.energy_between(t0_s, t1_s)`, read once per window while it is remembered.

        A figure is kept only once the meter has a sample at least an update period past the
        window: the monitor's integration (its short-window interpolation included) reads no
        sample beyond that, so a later read of the same window would give the same figure.
        """
        key = (t0_s, t1_s)
        with self._measured_lock:
            known = self._measured.get(key)
        if known is not None:
            return known
        measured = self.monitor.energy_between(t0_s, t1_s)
        latest = self.monitor.sampler.latest()
        period = float(getattr(self.monitor.meter, "update_period_s", 0.0) or 0.0)
        if latest is not None and latest[0] >= t1_s + period:
            with self._measured_lock:
                self._measured[key] = measured
                while len(self._measured) > _MAX_MEASURED:  # the oldest windows go first
                    del self._measured[next(iter(self._measured))]
        return measured

    def window_shares(
        self, window: Window, window_j: float, prefill_cost: float, decode_cost: float
    ) -> Mapping[str, float]:
        """`split_window(window, window_j, ...)`, computed once per window for all its requests.

        The split is a function of the window's bounds, energy, costs and work: a figure is
        reused only when all of them match (the work by identity, which the log's cached step
        groups make the common case, else by value), so a window whose work grew since (a late
        event at the same step) or a run weighing tokens at other costs is split afresh.
        """
        key = (window.t0_s, window.t1_s, window_j, prefill_cost, decode_cost)
        with self._measured_lock:
            known = self._split.get(key)
        if known is not None and (known[0] is window.work or known[0] == window.work):
            return known[1]
        shares = split_window(window, window_j, prefill_cost, decode_cost)
        with self._measured_lock:
            self._split[key] = (window.work, shares)
            while len(self._split) > _MAX_MEASURED:  # the oldest windows go first
                del self._split[next(iter(self._split))]
        return shares

    def costs(self) -> tuple[float, float]:
        """Per-token (prefill, decode) costs; plain token counts when they are not both positive."""
        prefill, decode = self._token_costs()
        if not (prefill > 0 and decode > 0 and prefill + decode < float("inf")):
            return 1.0, 1.0
        return float(prefill), float(decode)

    def measure_encode(self, work: Callable[[], T]) -> tuple[T, EnergyReport | None]:
        """As `Accounting.measure_encode`, charged only when the engine was idle throughout."""
        t0_s = time.monotonic()
        try:
            value, encode = super().measure_encode(work)
        except EncodeFailed as exc:
            exc.energy = exc.energy if self.log.idle_throughout(t0_s) else None
            raise
        return value, encode if self.log.idle_throughout(t0_s) else None

    def start(self, request_id: str, encode: EnergyReport | None) -> RunMeter:
        """Begin measuring a request's run."""
        return _BatchedRun(self.monitor, request_id, encode, self)


def make_accounting(monitor: EnergyMonitor, work_log: WorkLog | None, token_costs: TokenCosts) -> Accounting:
    """The accounting for an engine: batched when it keeps a work log, else single."""
    if work_log is None:
        return SingleAccounting(monitor)
    return BatchedAccounting(monitor, work_log, token_costs)
