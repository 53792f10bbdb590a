"""Sampler integration, monitor reports, short windows, idle baseline and read-failure fallback."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from joulecap.runtime.energy.base import MeterError
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.estimate import EstimateMeter
from joulecap.runtime.energy.jetson import JetsonMeter
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.energy.nvml import NvmlMeter
from joulecap.runtime.energy.replay import ReplayMeter
from joulecap.runtime.energy.sampler import Sampler
from joulecap.runtime.types import PhaseTimes


class Clock:
    """A hand-driven monotonic clock for the replay meter."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _trace(tmp_path: Path, rows: list[tuple[float, float]]) -> str:
    path = tmp_path / "trace.csv"
    path.write_text("time_s,VDD_IN_mw\n" + "".join(f"{t},{mw}\n" for t, mw in rows))
    return str(path)


def _step_trace(tmp_path: Path) -> str:
    # 4 W for 10 s, 10 W for 10 s, 6 W for 20 s (steps 1 ms wide).
    return _trace(
        tmp_path,
        [(0, 4000), (9.999, 4000), (10, 10000), (19.999, 10000), (20, 6000), (40, 6000)],
    )


# ---------------------------------------------------------------- sampler
def test_counter_windows_are_differences_interpolated_at_edges(tmp_path: Path) -> None:
    clock = Clock()
    meter = ReplayMeter(EnergyConfig(replay_trace=_trace(tmp_path, [(0, 2000), (10, 2000)])), clock=clock)
    sampler = Sampler(meter, sample_hz=10)
    for t in (0.0, 1.0, 2.0, 3.0):
        clock.t = t
        sampler.sample_now()
    w = sampler.integrate(0.5, 2.25)
    assert w.energy_j == pytest.approx(2.0 * 1.75)
    assert w.samples == 2
    assert sampler.integrate(2.0, 2.0).energy_j == 0.0
    # Beyond the newest sample the last power extrapolates.
    assert sampler.energy_at(4.0) - sampler.energy_at(3.0) == pytest.approx(2.0)


def test_power_meter_trapezoid_matches_readings(tmp_path: Path) -> None:
    hw = tmp_path / "sys/bus/i2c/devices/1-0040/hwmon/hwmon2"
    hw.mkdir(parents=True)
    (hw / "in1_label").write_text("VDD_IN\n")
    (hw / "in1_input").write_text("5000\n")
    drv = tmp_path / "sys/bus/i2c/drivers/ina3221"
    drv.mkdir(parents=True)
    (drv / "1-0040").symlink_to(Path("../../devices/1-0040"))
    meter = JetsonMeter(EnergyConfig(sysfs_root=str(tmp_path)))
    sampler = Sampler(meter, sample_hz=100)
    readings = []
    for ma in (1000, 1400, 2000, 600, 800):
        (hw / "curr1_input").write_text(f"{ma}\n")
        readings.append(sampler.sample_now())
        time.sleep(0.002)
    t = [r.t_s for r in readings]
    p = [r.power_w for r in readings]
    assert p == pytest.approx([5.0, 7.0, 10.0, 3.0, 4.0])
    expected = sum((t[i + 1] - t[i]) * (p[i] + p[i + 1]) / 2 for i in range(4))
    assert sampler.integrate(t[0], t[-1]).energy_j == pytest.approx(expected, rel=1e-9)
    # A window edge inside a segment integrates the linearly interpolated power.
    mid = (t[1] + t[2]) / 2
    part = (t[1] - t[0]) * (5 + 7) / 2 + (mid - t[1]) * (7 + 8.5) / 2
    assert sampler.integrate(t[0], mid).energy_j == pytest.approx(part, rel=1e-9)


def test_ring_buffer_keeps_newest(tmp_path: Path) -> None:
    clock = Clock()
    meter = ReplayMeter(EnergyConfig(replay_trace=_trace(tmp_path, [(0, 1000), (1000, 1000)])), clock=clock)
    sampler = Sampler(meter, sample_hz=10, history_s=1.0)  # capacity max(16, 10 + 16) = 26
    for i in range(200):
        clock.t = i * 0.1
        sampler.sample_now()
    assert len(sampler) == 26
    assert sampler.integrate(15.0, 19.9).energy_j == pytest.approx(4.9)


def test_background_thread_samples_and_stops(tmp_path: Path) -> None:
    meter = EstimateMeter(EnergyConfig())
    sampler = Sampler(meter, sample_hz=50)
    sampler.start()
    time.sleep(0.3)
    sampler.stop()
    n = len(sampler)
    assert 5 <= n <= 25 and not sampler.running
    time.sleep(0.05)
    assert len(sampler) == n


# ---------------------------------------------------------------- monitor reports
def test_report_splits_phases_and_idle_share(tmp_path: Path) -> None:
    clock = Clock()
    meter = ReplayMeter(EnergyConfig(replay_trace=_step_trace(tmp_path), replay_loop=False), clock=clock)
    monitor = EnergyMonitor(meter, EnergyConfig(idle_baseline_s=0, idle_refresh_s=2.0))
    for i in range(0, 201):
        clock.t = i * 0.1
        monitor.sampler.sample_now()
    report = monitor.report(PhaseTimes(12.0, 14.0, 18.0), predicted_prefill_j=1.0, predicted_decode_j=1.0)
    assert report.source == "replayed" and report.meter == "replay:trace:VDD_IN"
    assert report.prefill_j == pytest.approx(20.0)
    assert report.decode_j == pytest.approx(40.0)
    assert report.total_j == pytest.approx(60.0) and report.duration_s == pytest.approx(6.0)
    assert not report.interpolated and 59 <= report.samples <= 61
    # The idle gap before the request (0..12 s, mostly 4 W) refreshed the baseline.
    assert 4.0 <= monitor.idle_power_w < 5.5
    assert report.idle_j == pytest.approx(monitor.idle_power_w * 6.0)
    assert report.dynamic_j == pytest.approx(60.0 - report.idle_j)


def test_idle_baseline_refreshes_from_gaps_only(tmp_path: Path) -> None:
    clock = Clock()
    meter = ReplayMeter(EnergyConfig(replay_trace=_step_trace(tmp_path), replay_loop=False), clock=clock)
    monitor = EnergyMonitor(meter, EnergyConfig(idle_baseline_s=0, idle_refresh_s=2.0))

    def advance(until: float) -> None:
        while clock.t < until - 1e-9:
            clock.t = round(clock.t + 0.1, 6)
            monitor.sampler.sample_now()

    monitor.sampler.sample_now()
    advance(20.0)
    monitor.report(PhaseTimes(10.0, 11.0, 20.0))
    assert monitor.idle_power_w == pytest.approx(4.0)  # gap 0..10 s at 4 W
    advance(21.0)
    monitor.report(PhaseTimes(20.2, 20.5, 21.0))  # gap 20.0..20.2 s is too short: no refresh
    assert monitor.idle_power_w == pytest.approx(4.0)
    advance(35.0)
    monitor.report(PhaseTimes(31.0, 32.0, 35.0))  # gap 21..31 s at 6 W
    assert monitor.idle_power_w == pytest.approx(0.5 * 4.0 + 0.5 * 6.0)


def test_start_measures_idle_quickly() -> None:
    monitor = EnergyMonitor(
        EstimateMeter(EnergyConfig()), EnergyConfig(estimate_base_w=5.0, idle_baseline_s=0.2)
    )
    t0 = time.monotonic()
    monitor.start()
    try:
        assert time.monotonic() - t0 < 0.5
        # Idle: base watts plus this process's (small) CPU use while it waited.
        assert 5.0 <= monitor.idle_power_w < 5.0 + 15.0 * 0.5
        start = time.monotonic()
        sum(i * i for i in range(200_000))  # CPU work counts in the estimate
        first = time.monotonic()
        time.sleep(0.05)
        end = time.monotonic()
        report = monitor.report(PhaseTimes(start, first, end))
        assert report.source == "estimated" and report.meter == "estimate:cpu"
        assert report.total_j >= 5.0 * (end - start) * 0.99
        assert report.prefill_j > 5.0 * (first - start)  # CPU-busy phase costs more than base power
        assert monitor.live_energy_j(start) >= report.total_j * 0.99
    finally:
        monitor.stop()


# ---------------------------------------------------------------- NVML: short windows and failures
class _Nvml(types.ModuleType):
    NVML_ERROR_NOT_SUPPORTED = 3

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.energy_mj = 0
        self.power_mw: int | None = 100_000
        self.fail = False

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return "H100"

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        if self.fail:
            raise self.NVMLError(15)
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if self.power_mw is None:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        if self.fail:
            raise self.NVMLError(15)
        return self.power_mw


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Any:
    module = _Nvml()
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def test_short_window_uses_power_readings(nvml: Any) -> None:
    meter = NvmlMeter(EnergyConfig())
    assert meter.is_available().ok and meter.update_period_s == pytest.approx(0.1)
    monitor = EnergyMonitor(meter, EnergyConfig(idle_baseline_s=0))
    nvml.power_mw = 100_000
    a = monitor.sampler.sample_now()
    nvml.power_mw = 300_000  # the counter has not moved yet (it updates every ~100 ms)
    b = monitor.sampler.sample_now()
    w = monitor.energy_between(a.t_s, b.t_s)
    assert w.interpolated and w.method == "power"
    # Trapezoid of the power readings (100 W -> 300 W), not the counter, which did not move.
    assert w.energy_j == pytest.approx(200.0 * (b.t_s - a.t_s), rel=1e-6)
    report = monitor.report(PhaseTimes(a.t_s, a.t_s + (b.t_s - a.t_s) / 2, b.t_s))
    assert report.interpolated and "update period" in report.note
    assert report.source == "measured" and report.meter == "nvml:0"
    # A counter that moves every ~100 ms lags the governor's checks: the governor must not trust it
    # alone (the estimate meter, read afresh on each check, can be).
    assert not monitor.reads_fresh
    assert EnergyMonitor(EstimateMeter(EnergyConfig()), EnergyConfig(idle_baseline_s=0)).reads_fresh


def test_short_window_without_power_uses_predictor_split(nvml: Any) -> None:
    nvml.power_mw = None  # counter only
    meter = NvmlMeter(EnergyConfig())
    assert meter.is_available().ok
    monitor = EnergyMonitor(meter, EnergyConfig(idle_baseline_s=0))
    a = monitor.sampler.sample_now()
    time.sleep(0.12)
    nvml.energy_mj += 24_000  # 24 J over the request
    b = monitor.sampler.sample_now()
    first = a.t_s + 0.01  # a 10 ms prefill: shorter than the counter period
    report = monitor.report(PhaseTimes(a.t_s, first, b.t_s), predicted_prefill_j=1.0, predicted_decode_j=3.0)
    assert report.interpolated and "predictor" in report.note
    assert report.total_j == pytest.approx(24.0)
    assert report.prefill_j == pytest.approx(6.0) and report.decode_j == pytest.approx(18.0)


def test_long_window_uses_the_counter(nvml: Any) -> None:
    meter = NvmlMeter(EnergyConfig())
    monitor = EnergyMonitor(meter, EnergyConfig(idle_baseline_s=0))
    a = monitor.sampler.sample_now()
    time.sleep(0.11)
    nvml.energy_mj += 5_000
    b = monitor.sampler.sample_now()
    time.sleep(0.11)
    nvml.energy_mj += 7_000
    c = monitor.sampler.sample_now()
    report = monitor.report(PhaseTimes(a.t_s, b.t_s, c.t_s))
    assert not report.interpolated
    assert report.prefill_j == pytest.approx(5.0) and report.decode_j == pytest.approx(7.0)


def test_read_failure_mid_request_falls_back_to_estimate(nvml: Any) -> None:
    meter = NvmlMeter(EnergyConfig())
    monitor = EnergyMonitor(meter, EnergyConfig(idle_baseline_s=0))
    a = monitor.sampler.sample_now()
    nvml.fail = True
    with pytest.raises(MeterError):
        monitor.sampler.sample_now()
    nvml.fail = False
    end = time.monotonic()
    report = monitor.report(PhaseTimes(a.t_s, a.t_s, end), predicted_prefill_j=2.0, predicted_decode_j=3.0)
    assert report.source == "estimated" and report.meter == "estimate:predictor"
    assert report.total_j == pytest.approx(5.0) and "failed" in report.note and "nvml:0" in report.note
    # A failure at the end read, with no prediction: idle/base power x duration, still no exception.
    nvml.fail = True
    end2 = time.monotonic()
    report2 = monitor.report(PhaseTimes(end, end, end2))
    assert report2.source == "estimated" and report2.total_j == pytest.approx(5.0 * (end2 - end))


def test_monitor_start_survives_a_dead_meter(nvml: Any) -> None:
    meter = NvmlMeter(EnergyConfig())
    assert meter.is_available().ok
    nvml.fail = True
    monitor = EnergyMonitor(meter, EnergyConfig(idle_baseline_s=0.05, sample_hz=20))
    monitor.start()
    try:
        assert monitor.idle_power_w == 0.0
        t = time.monotonic()
        assert monitor.live_energy_j(t - 1) == 0.0
        assert monitor.report(PhaseTimes(t - 1, t - 0.5, t)).source == "estimated"
    finally:
        monitor.stop()
