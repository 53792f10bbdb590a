"""Real NVML on a real NVIDIA GPU (`pytest -m gpu`); skipped where there is none."""

from __future__ import annotations

import time

import pytest

from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.energy.nvml import NvmlMeter
from joulecap.runtime.types import PhaseTimes

pytestmark = pytest.mark.gpu


@pytest.fixture
def nvml_meter() -> NvmlMeter:
    meter = NvmlMeter(EnergyConfig(gpu_indices=(0,)))
    availability = meter.is_available()
    if not availability.ok:
        pytest.skip(f"no usable NVIDIA GPU: {availability.reason}")
    return meter


def _load(seconds: float) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    a = torch.randn(4096, 4096, device="cuda")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a = (a @ a).tanh_()
        torch.cuda.synchronize()


def test_real_counter_moves_and_reports_power(nvml_meter: NvmlMeter) -> None:
    first = nvml_meter.read()
    time.sleep(0.3)
    second = nvml_meter.read()
    assert nvml_meter.name == "nvml:0"
    if nvml_meter.mode == "counter":
        assert first.energy_j is not None and second.energy_j is not None
        assert second.energy_j > first.energy_j  # a GPU draws power even when idle
    assert second.power_w is not None and 1.0 < second.power_w < 2000.0
    nvml_meter.close()


def test_real_monitor_report_under_load(nvml_meter: NvmlMeter) -> None:
    monitor = EnergyMonitor(nvml_meter, EnergyConfig(sample_hz=20, idle_baseline_s=0.5))
    monitor.start()
    try:
        start = time.monotonic()
        _load(0.5)
        first = time.monotonic()
        _load(1.5)
        end = time.monotonic()
        report = monitor.report(PhaseTimes(start, first, end))
    finally:
        monitor.stop()
        nvml_meter.close()
    assert report.source == "measured" and report.meter == "nvml:0"
    assert report.total_j > 0 and report.prefill_j > 0 and report.decode_j > report.prefill_j
    # Under load the GPU draws more than at idle.
    assert report.total_j / report.duration_s > monitor.idle_power_w
