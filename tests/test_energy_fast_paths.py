"""The per-request energy path's fast forms give what their plain definitions give.

`WorkLog.windows_of` (a request's windows found from its own events) equals the full cut of its
span, on random logs shaped like vLLM's: arrivals inserted in the past, several requests finishing
work in one step (same time), begin-only stretches, readers starting anywhere, steps that grow
after a read. The monitor's idle gap (one pass by falling start) ends where repeated passes over
the busy intervals end. A window's integral is its definition, and a batched report (each window
read and split once for all of its requests) is the plain split of its windows, to the last bit.
The estimate meter reads a child's CPU time as psutil does. Fast and vLLM-free.
"""

from __future__ import annotations

import math
import random
import sys
import time
from typing import Any

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
    monitor._idle_until = rng.choice([-math.inf, rng.uniform(0, 20)])
    oldest = rng.choice([-5.0, rng.uniform(0, 20)])
    monitor.sampler.oldest_t = lambda: oldest  # type: ignore[method-assign]
    for before_s in [rng.uniform(0, 55), *(b for _, b in busy[:5]), *(a for a, _ in busy[:5])]:
        gap_start, gap_end = monitor._idle_gap(before_s)
        intervals = [*monitor._busy, *live.items()]
        assert gap_end == _gap_end_by_passes(intervals, before_s)
        # It starts at the latest end at or before its end (nothing before the floor counts).
        floor = max(monitor._idle_until, oldest)
        assert gap_start == max([floor, *(b for _, b in intervals if b <= gap_end)])


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


# ---------------------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("seed", range(60))
def test_a_window_s_integral_is_its_definition_to_the_last_bit(seed: int) -> None:
    import numpy as np

    from joulecap.runtime.energy.base import MeterReading
    from joulecap.runtime.energy.sampler import Sampler, _finite

    def _energy_at(t: Any, p: Any, e: Any, x: float, *, counter: bool) -> float:
        # The definition in NumPy scalars, independent of the sampler's Python-float path.
        if x <= t[0]:
            return float(e[0] - (t[0] - x) * _finite(p[0]))
        if x >= t[-1]:
            return float(e[-1] + (x - t[-1]) * _finite(p[-1]))
        i = int(np.searchsorted(t, x, side="right")) - 1  # t[i] <= x < t[i+1]
        frac = (x - t[i]) / (t[i + 1] - t[i])
        if counter:
            return float(e[i] + frac * (e[i + 1] - e[i]))
        px = p[i] + frac * (p[i + 1] - p[i])
        return float(e[i] + (x - t[i]) * (p[i] + px) / 2.0)

    rng = random.Random(seed)
    counter = rng.random() < 0.5

    class Meter:
        name, source, update_period_s = "m", "measured", 0.0

    sampler = Sampler(Meter(), sample_hz=10.0)  # type: ignore[arg-type]
    t = e = 0.0
    for _ in range(rng.randint(1, 30)):
        t += rng.choice([0.001, 0.1, rng.random()])
        e += rng.random()
        power = None if counter and rng.random() < 0.5 else 50.0 * rng.random()
        sampler._append(MeterReading(t_s=t, energy_j=e if counter else None, power_w=power))
    ts, ps, es = sampler._ring.view()
    edges = [rng.uniform(-1.0, t + 1.0) for _ in range(12)] + [float(x) for x in ts[:4]]
    for t0 in edges:
        for t1 in edges:
            if t1 <= t0:
                continue
            got = sampler.integrate(t0, t1)
            e1 = _energy_at(ts, ps, es, t1, counter=counter)
            e0 = _energy_at(ts, ps, es, t0, counter=counter)
            inside = int(np.searchsorted(ts, t1, side="right") - np.searchsorted(ts, t0, side="left"))
            assert (got.energy_j, got.samples) == (max(0.0, e1 - e0), inside)


# ---------------------------------------------------------------------------------------- step groups
@pytest.mark.parametrize("seed", range(60))
def test_windows_of_stays_the_full_cut_when_a_step_grows_after_a_read(seed: int) -> None:
    # vLLM's outputs of one step reach the log one request at a time: a reader may see a step
    # before the rest of its work arrives. The step's remembered work must not outlive that.
    log, ids = _random_log(seed)
    rng = random.Random(seed)
    for rid in ids:
        log.windows_of(rid)
    times = sorted({e.t_s for e in log.events()})
    for _ in range(5):
        t = rng.choice(times)
        log.record(rng.choice(ids), decode_tokens=1, prefill_tokens=rng.randint(0, 3), t_s=t)
    for rid in ids:
        assert log.windows_of(rid) == [w for w in windows(log.events()) if rid in w.work], rid


# ---------------------------------------------------------------------------------------- batched reports
class _Counter:
    """A counter meter on a script's clock: `energy(t)` joules at `now`."""

    name, source, update_period_s = "counter", "measured", 0.0

    def __init__(self) -> None:
        self.now = 0.0

    def read(self) -> Any:
        from joulecap.runtime.energy.base import MeterReading

        t = self.now
        return MeterReading(t_s=t, energy_j=30.0 * t + 2.0 * math.sin(7.0 * t) + 0.3 * t * t)


def _replay_batches(seed: int) -> list[tuple[Any, Any]]:
    """vLLM-like batches through `BatchedAccounting`: each report with its plain-definition twin.

    Requests arrive while others run, steps of 2-6 ms finish a token for every running request at
    one time, the meter is sampled at 10 Hz and read at each report. Right after a request's
    report the same split is made from its plain definitions: the full cut of the log, the
    monitor's own window reads, `split_by_token_work` per window.
    """
    from joulecap.runtime.energy.accounting import BatchedAccounting
    from joulecap.runtime.energy.config import EnergyConfig
    from joulecap.runtime.energy.monitor import EnergyMonitor
    from joulecap.runtime.energy.worklog import attribute
    from joulecap.runtime.types import PhaseTimes, Prediction

    rng = random.Random(seed)
    meter = _Counter()
    monitor = EnergyMonitor(meter, EnergyConfig(idle_baseline_s=0.0))  # type: ignore[arg-type]
    log = WorkLog()
    costs = (0.003, 0.01)
    acc = BatchedAccounting(monitor, log, lambda: costs)
    pairs = []
    t, next_sample = 1.0, 1.0

    def advance(to: float) -> None:
        nonlocal next_sample
        while next_sample <= to:
            meter.now = next_sample
            monitor.sampler.sample_now()
            next_sample += 0.1

    for batch in range(2):
        pending = [f"r{batch}-{i}" for i in range(rng.randint(4, 16))]
        running: dict[str, list[Any]] = {}
        while pending or running:
            while pending and len(running) < 4:
                rid = pending.pop(0)
                advance(t)
                meter.now += 1e-6
                run = acc.start(rid, None)
                log.busy(rid)
                log.begin(rid, t - rng.choice([0.0, 0.0005, 0.002]))
                running[rid] = [run, log.events()[-1].t_s, None, rng.randint(1, 12)]
            t += rng.uniform(0.002, 0.006)
            advance(t)
            for rid, state in list(running.items()):
                first = state[2] is None
                log.record(rid, prefill_tokens=80 if first else 0, decode_tokens=0 if first else 1, t_s=t)
                state[2] = t if first else state[2]
                state[3] -= 1
                if state[3] > 0:
                    continue
                run, start, first_s, _ = running.pop(rid)
                log.end(rid, t)
                end = t + rng.uniform(0.0001, 0.001)
                meter.now = max(meter.now + 1e-6, end + 1e-5)
                report = run.report(PhaseTimes(start, first_s, end), Prediction(0.2, 0.05, 0.15))
                plain = attribute(
                    rid,
                    [w for w in windows(log.events(start - 1.0, end)) if rid in w.work],
                    monitor.energy_between,
                    prefill_cost=costs[0],
                    decode_cost=costs[1],
                    idle_power_w=monitor.idle_power_w,
                )
                pairs.append((report, plain))
        t += rng.uniform(0.05, 3.0)  # idle between batches
    return pairs


@pytest.mark.parametrize("seed", range(12))
def test_a_batched_report_is_the_plain_split_of_its_windows_to_the_last_bit(seed: int) -> None:
    # The report path reads each window and splits it once for all of its requests (cached
    # figures, shared step groups); every number must be what the plain definitions give.
    pairs = _replay_batches(seed)
    assert pairs
    for report, plain in pairs:
        assert report.source == "measured" and "split by token work" in report.note
        assert report.total_j == plain.total_j and report.prefill_j == plain.prefill_j
        assert report.decode_j == plain.total_j - plain.prefill_j and report.idle_j == plain.idle_j
        assert f"{plain.windows} engine step window(s), {plain.shared_windows} shared" in report.note


def test_a_window_is_split_once_for_all_its_requests_and_again_when_its_work_grows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from joulecap.runtime.energy import accounting
    from joulecap.runtime.energy.attribution import TokenWork
    from joulecap.runtime.energy.worklog import Window

    splits: list[Window] = []
    plain = accounting.split_window
    monkeypatch.setattr(accounting, "split_window", lambda w, *a: splits.append(w) or plain(w, *a))
    acc = accounting.BatchedAccounting(None, WorkLog(), lambda: (1.0, 1.0))  # type: ignore[arg-type]
    step = Window(0.0, 1.0, {"a": TokenWork(0, 1), "b": TokenWork(3, 0)})
    assert acc.window_shares(step, 2.0, 1.0, 1.0) == {"a": 0.5, "b": 1.5}
    assert acc.window_shares(Window(0.0, 1.0, dict(step.work)), 2.0, 1.0, 1.0) == {"a": 0.5, "b": 1.5}
    assert len(splits) == 1  # the second request of the window reused the first's split
    grown = Window(0.0, 1.0, {**step.work, "c": TokenWork(0, 4)})  # a late output of the same step
    assert acc.window_shares(grown, 2.0, 1.0, 1.0) == {"a": 0.25, "b": 0.75, "c": 1.0}
    assert acc.window_shares(step, 2.0, 2.0, 1.0) == pytest.approx({"a": 2 / 7, "b": 12 / 7})  # other costs
    assert acc.window_shares(step, 3.0, 1.0, 1.0) == {"a": 0.75, "b": 2.25}  # another figure
    assert len(splits) == 4


# ---------------------------------------------------------------------------------------- the meter
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_process_tree_clock_reads_a_child_as_psutil_does() -> None:
    import subprocess

    import psutil

    from joulecap.runtime.energy.estimate import ProcessTreeCpuClock

    spin = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.2: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", spin])
    clock = ProcessTreeCpuClock()
    try:
        proc = psutil.Process(child.pid)
        deadline = time.monotonic() + 20
        while sum(proc.cpu_times()[:2]) < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.05)  # asleep now: its times stay put
        times = proc.cpu_times()
        assert clock._child_seconds(proc) == times.user + times.system
        clock()
        assert child.pid in clock._stat_fds
    finally:
        child.kill()
        child.wait()
    clock()  # exited: its last reading stays, the read that failed is skipped
    assert clock._children_s[child.pid] >= 0.2
    clock.close()
    assert not clock._stat_fds


def test_the_process_tree_clock_leaves_its_own_listing_out() -> None:
    # Listing the children scans the process table; counted, that CPU would land on whichever
    # request window opened at the read. A listing that burns 50 ms shows as 50 ms of process CPU
    # and not in the clock.
    from joulecap.runtime.energy.estimate import ProcessTreeCpuClock

    class SlowTable:
        def children(self, recursive: bool = False) -> list[object]:
            start = time.thread_time()
            while time.thread_time() - start < 0.05:
                pass
            return []

    clock = ProcessTreeCpuClock()
    clock._proc = SlowTable()  # type: ignore[assignment]
    first = clock()
    cpu_before = time.process_time()
    clock._listed_at_s = -float("inf")  # the next read lists again
    second = clock()
    assert time.process_time() - cpu_before >= 0.05
    assert 0.0 <= second - first < 0.02
    assert clock._listing_s >= 0.1  # both listings, left out
