"""The per-request energy path's fast forms give what their plain definitions give.

`WorkLog.windows_of` (a request's windows found from its own events) equals the full cut of its
span, on random logs shaped like vLLM's: arrivals inserted in the past, several requests finishing
work in one step (same time), begin-only stretches, readers starting anywhere. The monitor's idle
gap (one pass by falling start) ends where repeated passes over the busy intervals end. Fast and
vLLM-free.
"""

from __future__ import annotations

import math
import random

import pytest

from joulecap.runtime.energy import worklog as worklog_module
from joulecap.runtime.energy.worklog import WorkLog, windows


def _random_log(seed: int) -> tuple[WorkLog, list[str]]:
    rng = random.Random(seed)
    log = WorkLog()
    t = 0.0
    running: list[str] = []
    ids: list[str] = []
    for step in range(rng.randint(5, 60)):
        t += rng.choice([0.01, 0.02, 0.5])
        if rng.random() < 0.4 or not running:
            rid = f"r{step}"
            # Arrivals are stamped when the run starts, logged a little later (as the engine does).
            log.begin(rid, t - rng.choice([0.0, 0.005, 0.03]))
            ids.append(rid)
            running.append(rid)
            if rng.random() < 0.3:
                t += 0.01
                continue  # a step with nobody's work: a begin-only group
        first = set(rng.sample(running, k=rng.randint(1, len(running))))
        for rid in running:
            if rid in first:
                log.record(rid, prefill_tokens=rng.randint(1, 9), decode_tokens=rng.randint(0, 1), t_s=t)
        if rng.random() < 0.25:
            running.remove(rng.choice(running))
    return log, ids


@pytest.mark.parametrize("seed", range(200))
def test_windows_of_equals_the_full_cut(seed: int) -> None:
    log, ids = _random_log(seed)
    rng = random.Random(seed)
    events = log.events()
    first, last = events[0].t_s, events[-1].t_s
    for rid in ids:
        begun = next(e.t_s for e in events if e.request_id == rid and not e.prefill_tokens + e.decode_tokens)
        for t0, t1 in [
            (-math.inf, math.inf),
            (begun - 1.0, last),
            (begun, last),
            (rng.uniform(first, begun), rng.uniform(begun, last)),
        ]:
            full = [w for w in windows(log.events(t0, t1)) if rid in w.work]
            assert log.windows_of(rid, t0, t1) == full, (rid, t0, t1)


def test_windows_of_leaves_out_work_dropped_with_the_history() -> None:
    log = WorkLog(history_s=5.0)
    log.begin("A", 0.0)
    log.record("A", prefill_tokens=2, t_s=1.0)
    log.begin("B", 2.0)
    for t in (3.0, 4.0, 6.0, 8.0):
        log.record("A", decode_tokens=1, t_s=t)
        log.record("B", decode_tokens=1, t_s=t)
    for rid in ("A", "B"):
        for t0 in (-math.inf, 2.5, 3.0, 3.5):
            assert log.windows_of(rid, t0, 9.0) == [w for w in windows(log.events(t0, 9.0)) if rid in w.work]


def test_windows_of_falls_back_to_the_full_cut_when_its_index_cannot_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = WorkLog()
    log.record("untracked", decode_tokens=1, t_s=1.0)  # work without a begin: no index
    log.begin("A", 1.5)
    log.record("A", prefill_tokens=3, t_s=2.0)
    log.record("untracked", decode_tokens=1, t_s=2.0)
    assert log.windows_of("untracked") == [w for w in windows(log.events()) if "untracked" in w.work]
    log.begin("A", 2.5)  # begun twice
    log.record("A", decode_tokens=1, t_s=3.0)
    assert log.windows_of("A") == [w for w in windows(log.events()) if "A" in w.work]
    # Begins dropped from the index while still inside a reader's span.
    monkeypatch.setattr(worklog_module, "_MAX_TRACKED", 2)
    small = WorkLog()
    for k in range(4):
        small.begin(f"q{k}", float(k))
    small.record("q3", prefill_tokens=1, t_s=4.0)
    small.record("q0", decode_tokens=1, t_s=4.0)
    assert small.windows_of("q3", 0.0, 5.0) == [w for w in windows(small.events(0.0, 5.0)) if "q3" in w.work]


def _gap_end_by_passes(intervals: list[tuple[float, float]], before_s: float) -> float:
    """The idle gap's end as repeated passes find it (the definition)."""
    gap_end, changed = before_s, True
    while changed:
        changed = False
        for a, b in intervals:
            if a < gap_end <= b:
                gap_end, changed = a, True
    return gap_end


@pytest.mark.parametrize("seed", range(100))
def test_the_idle_gap_ends_where_repeated_passes_end(seed: int) -> None:
    from joulecap.runtime.energy.config import EnergyConfig
    from joulecap.runtime.energy.estimate import EstimateMeter
    from joulecap.runtime.energy.monitor import EnergyMonitor

    rng = random.Random(seed)
    monitor = EnergyMonitor(EstimateMeter(EnergyConfig()), EnergyConfig())
    busy = []
    for _ in range(rng.randint(0, 80)):
        a = rng.choice([rng.uniform(0, 50), float(rng.randint(0, 50))])
        busy.append((a, a + rng.choice([0.0, rng.uniform(0, 3), float(rng.randint(0, 3))])))
    live = {a: b for a, b in busy[: len(busy) // 3]}
    monitor._busy, monitor._live = busy[len(busy) // 3 :], live
    for before_s in [rng.uniform(0, 55), *(b for _, b in busy[:5]), *(a for a, _ in busy[:5])]:
        _, gap_end = monitor._idle_gap(before_s)
        assert gap_end == _gap_end_by_passes([*monitor._busy, *live.items()], before_s)


def test_a_window_is_read_from_the_meter_once_when_its_figure_is_settled() -> None:
    from joulecap.runtime.energy.accounting import BatchedAccounting
    from joulecap.runtime.energy.base import MeterReading
    from joulecap.runtime.energy.config import EnergyConfig
    from joulecap.runtime.energy.monitor import EnergyMonitor

    class Counter:
        name, source, update_period_s = "counter", "measured", 0.0
        now = 0.0

        def read(self) -> MeterReading:
            return MeterReading(t_s=self.now, energy_j=10.0 * self.now)

    meter = Counter()
    monitor = EnergyMonitor(meter, EnergyConfig(idle_baseline_s=0.0, idle_refresh_s=0.0))  # type: ignore[arg-type]
    for t in (0.0, 1.0, 2.0):
        meter.now = t
        monitor.sampler.sample_now()
    reads: list[tuple[float, float]] = []
    between = monitor.energy_between
    monitor.energy_between = lambda t0, t1: reads.append((t0, t1)) or between(t0, t1)  # type: ignore[method-assign]
    acc = BatchedAccounting(monitor, WorkLog(), lambda: (1.0, 1.0))
    first = acc.window_energy(0.5, 1.5)
    assert acc.window_energy(0.5, 1.5) == first and first.energy_j == pytest.approx(10.0)
    assert reads == [(0.5, 1.5)]  # the second request's read came from the first's
    # A window past the newest sample would be extrapolated: read again until a sample follows it.
    monitor.sampler.sample_now = lambda: None  # type: ignore[assignment,method-assign,return-value]
    acc.window_energy(1.5, 2.5)
    acc.window_energy(1.5, 2.5)
    assert reads[1:] == [(1.5, 2.5), (1.5, 2.5)]
