"""Meter backends against faked hardware boundaries: sysfs trees, a fake pynvml, scripts."""

from __future__ import annotations

import io
import os
import pathlib
import stat
import sys
import textwrap
import time
import types
from pathlib import Path
from typing import Any

import pytest

from joulecap.runtime.energy.base import Meter, MeterError
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.estimate import EstimateMeter
from joulecap.runtime.energy.factory import AUTO_ORDER, create_meter, meters_command, probe_meters
from joulecap.runtime.energy.jetson import JetsonMeter, scan_ina3221, select_total_rails
from joulecap.runtime.energy.jtop_meter import JtopMeter
from joulecap.runtime.energy.nvml import NvmlMeter
from joulecap.runtime.energy.rapl import RaplMeter
from joulecap.runtime.energy.replay import ReplayMeter, load_trace
from joulecap.runtime.energy.tegrastats import TegrastatsMeter, parse_tegrastats

FIXTURES = Path(__file__).parent / "fixtures" / "energy"
ISSUE_LINE = (
    "11-30-2025 13:26:01 RAM 2461/7620MB (lfb 3x2MB) SWAP 1243/3810MB (cached 5MB) CPU "
    "[19%@729,14%@729,22%@729,8%@729,15%@729,17%@729] EMC_FREQ 4%@2133 GR3D_FREQ 0%@[305] NVDEC off "
    "NVJPG off NVJPG1 off VIC off OFA off APE 200 cpu@46.531C soc2@47.312C soc0@46.593C gpu@48.218C "
    "tj@48.843C soc1@48.843C VDD_IN 5704mW/5704mW VDD_CPU_GPU_CV 831mW/831mW VDD_SOC 1624mW/1624mW"
)


# ---------------------------------------------------------------- tegrastats parser
def test_parse_issue_line_exactly() -> None:
    assert parse_tegrastats(ISSUE_LINE) == {"VDD_IN": 5704.0, "VDD_CPU_GPU_CV": 831.0, "VDD_SOC": 1624.0}


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("tegrastats_orin_nano.txt", [{"VDD_IN": 5704, "VDD_CPU_GPU_CV": 831, "VDD_SOC": 1624}, None]),
        (
            "tegrastats_agx_orin.txt",
            [{"VDD_GPU_SOC": 2412, "VDD_CPU_CV": 402, "VIN_SYS_5V0": 3724, "VDDQ_VDD2_1V8AO": 502}],
        ),
        ("tegrastats_three_value.txt", [{"VDD_IN": 8470, "VDD_CPU_GPU_CV": 3630, "VDD_SOC": 1870}]),
        ("tegrastats_jetpack4.txt", [{"POM_5V_IN": 2430, "POM_5V_GPU": 80, "POM_5V_CPU": 480}]),
    ],
)
def test_parse_recorded_formats(fixture: str, expected: list[dict[str, int] | None]) -> None:
    lines = (FIXTURES / fixture).read_text().splitlines()
    for line, want in zip(lines, expected, strict=False):
        got = parse_tegrastats(line)
        assert len(got) >= 3
        if want is not None:
            assert got == {k: float(v) for k, v in want.items()}


def test_parse_ignores_non_power_fields() -> None:
    line = (
        "RAM 2461/7620MB (lfb 3x2MB) SWAP 1243/3810MB (cached 5MB) IRAM 0/252kB(lfb 252kB) "
        "CPU [1%@729] EMC_FREQ 4%@2133 GR3D_FREQ 0%@[305] APE 200 cpu@46.5C"
    )
    assert parse_tegrastats(line) == {}
    assert parse_tegrastats("") == {}
    # The third value of the newer format is not mistaken for the current power.
    assert parse_tegrastats("VDD_GPU 100mW/200mW/300mW") == {"VDD_GPU": 100.0}


# ---------------------------------------------------------------- Jetson sysfs trees
def _hwmon(root: Path, device: str, hwmon: int, channels: dict[int, tuple[str, int, int]]) -> Path:
    """Build a sysfs device dir with INA3221 channels {n: (label, mV, mA)} and its driver symlink."""
    dev = root / "sys" / "bus" / "i2c" / "devices" / device
    hw = dev / "hwmon" / f"hwmon{hwmon}"
    hw.mkdir(parents=True)
    (hw / "name").write_text("ina3221\n")
    for n, (label, mv, ma) in channels.items():
        (hw / f"in{n}_label").write_text(label + "\n")
        (hw / f"in{n}_input").write_text(f"{mv}\n")
        (hw / f"curr{n}_input").write_text(f"{ma}\n")
    # The mainline driver's extra files that are not rails.
    (hw / "in7_input").write_text("1000\n")
    (hw / "in4_input").write_text("12\n")
    drv = root / "sys" / "bus" / "i2c" / "drivers" / "ina3221"
    drv.mkdir(parents=True, exist_ok=True)
    (drv / device).symlink_to(os.path.relpath(dev, drv))
    return hw


@pytest.fixture
def orin_nano_root(tmp_path: Path) -> Path:
    _hwmon(
        tmp_path,
        "1-0040",
        1,
        {1: ("VDD_IN", 5000, 1200), 2: ("VDD_CPU_GPU_CV", 5000, 180), 3: ("VDD_SOC", 5000, 320)},
    )
    return tmp_path


@pytest.fixture
def agx_orin_root(tmp_path: Path) -> Path:
    _hwmon(
        tmp_path,
        "1-0040",
        3,
        {1: ("VDD_GPU_SOC", 5000, 600), 2: ("VDD_CPU_CV", 5000, 100), 3: ("VIN_SYS_5V0", 5000, 700)},
    )
    _hwmon(tmp_path, "1-0041", 4, {1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 5000, 100), 3: ("NC", 0, 0)})
    return tmp_path


def test_jetson_orin_nano_uses_vdd_in(orin_nano_root: Path) -> None:
    meter = JetsonMeter(EnergyConfig(sysfs_root=str(orin_nano_root)))
    assert meter.is_available().ok
    assert meter.name == "jetson:VDD_IN"
    assert meter.read().power_w == pytest.approx(5.0 * 1.2)
    assert meter.read_rails_w() == pytest.approx({"VDD_IN": 6.0, "VDD_CPU_GPU_CV": 0.9, "VDD_SOC": 1.6})


def test_jetson_agx_orin_sums_connected_rails(agx_orin_root: Path) -> None:
    meter = JetsonMeter(EnergyConfig(sysfs_root=str(agx_orin_root)))
    assert meter.is_available().ok
    assert meter.name == "jetson:VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO"
    assert meter.read().power_w == pytest.approx(5.0 * (0.6 + 0.1 + 0.7 + 0.1))
    assert {r.device for r in scan_ina3221(agx_orin_root)} == {"1-0040", "1-0041"}


def test_jetson_values_are_read_live_and_power_file_preferred(orin_nano_root: Path) -> None:
    meter = JetsonMeter(EnergyConfig(sysfs_root=str(orin_nano_root)))
    hw = next((orin_nano_root / "sys/bus/i2c/devices/1-0040/hwmon").iterdir())
    (hw / "curr1_input").write_text("2000\n")
    assert meter.read().power_w == pytest.approx(10.0)
    (hw / "power1_input").write_text("7250000\n")  # uW, where a driver provides it
    meter2 = JetsonMeter(EnergyConfig(sysfs_root=str(orin_nano_root)))
    assert meter2.read().power_w == pytest.approx(7.25)


def test_jetson_configured_rails_and_errors(
    agx_orin_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cfg = EnergyConfig(sysfs_root=str(agx_orin_root), jetson_rails=("VDD_GPU_SOC", "VDD_CPU_CV"))
    meter = JetsonMeter(cfg)
    assert meter.read().power_w == pytest.approx(3.5)
    bad = JetsonMeter(EnergyConfig(sysfs_root=str(agx_orin_root), jetson_rails=("VDD_IN",)))
    availability = bad.is_available()
    assert not availability.ok and "VDD_IN" in availability.reason and "VDD_GPU_SOC" in availability.reason
    empty = JetsonMeter(EnergyConfig(sysfs_root=str(tmp_path_factory.mktemp("empty"))))
    assert "no INA3221 rails" in empty.is_available().reason
    with pytest.raises(MeterError):
        empty.read()


def test_select_total_rails_rules() -> None:
    assert select_total_rails(["VDD_IN", "VDD_SOC"]) == ["VDD_IN"]
    assert select_total_rails(["POM_5V_IN", "POM_5V_GPU"]) == ["POM_5V_IN"]
    assert select_total_rails(["A", "B"]) == ["A", "B"]
    with pytest.raises(ValueError):
        select_total_rails([])


# ---------------------------------------------------------------- RAPL
def _rapl(root: Path, index: int, name: str, energy_uj: int, max_uj: int) -> Path:
    d = root / "sys/class/powercap" / f"intel-rapl:{index}"
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def test_rapl_sums_packages_and_handles_wraparound(tmp_path: Path) -> None:
    p0 = _rapl(tmp_path, 0, "package-0", 999_000_000, 1_000_000_000)
    _rapl(tmp_path, 1, "psys", 5, 1_000_000_000)  # overlaps the packages: not added
    sub = tmp_path / "sys/class/powercap/intel-rapl:0:0"
    sub.mkdir()
    (sub / "name").write_text("core\n")
    meter = RaplMeter(EnergyConfig(sysfs_root=str(tmp_path)))
    assert meter.is_available().ok
    assert meter.name == "rapl:package-0"
    assert meter.read().energy_j == 0.0
    (p0 / "energy_uj").write_text("999_500_000\n".replace("_", ""))
    assert meter.read().energy_j == pytest.approx(0.5)
    (p0 / "energy_uj").write_text("250000\n")  # wrapped at 1e9 uJ
    assert meter.read().energy_j == pytest.approx(0.5 + 0.5 + 0.25)


def test_rapl_permission_error_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _rapl(tmp_path, 0, "package-0", 1, 10)
    real_read_text = pathlib.Path.read_text

    def deny(self: pathlib.Path, *args: Any, **kwargs: Any) -> str:
        # The OS boundary: energy_uj is root-only on Linux >= 5.10.
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", deny)
    availability = RaplMeter(EnergyConfig(sysfs_root=str(tmp_path))).is_available()
    assert not availability.ok
    assert "permission denied" in availability.reason and "root" in availability.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of mode")
def test_rapl_real_file_mode_permission(tmp_path: Path) -> None:
    d = _rapl(tmp_path, 0, "package-0", 1, 10)
    (d / "energy_uj").chmod(stat.S_IWUSR)
    assert "permission denied" in RaplMeter(EnergyConfig(sysfs_root=str(tmp_path))).is_available().reason


def test_rapl_absent_here_says_why(tmp_path: Path) -> None:
    reason = RaplMeter(EnergyConfig(sysfs_root=str(tmp_path))).is_available().reason
    assert "no RAPL package domains" in reason


# ---------------------------------------------------------------- NVML (fake pynvml module)
class FakeNvml(types.ModuleType):
    """A stand-in for the `pynvml` module with scriptable GPUs."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_UNKNOWN = 999

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self, gpus: list[dict[str, Any]], *, init_error: int | None = None) -> None:
        super().__init__("pynvml")
        self.gpus = gpus
        self.init_error = init_error
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.NVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return self.gpus[i]

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> bytes:
        return str(h["name"]).encode()

    def nvmlDeviceGetTotalEnergyConsumption(self, h: dict[str, Any]) -> int:
        if h.get("energy_mj") is None:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        if h.get("fail"):
            raise self.NVMLError(self.NVML_ERROR_UNKNOWN)
        return int(h["energy_mj"])

    def nvmlDeviceGetPowerUsage(self, h: dict[str, Any]) -> int:
        if h.get("power_mw") is None:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        if h.get("fail"):
            raise self.NVMLError(self.NVML_ERROR_UNKNOWN)
        return int(h["power_mw"])


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(gpus: list[dict[str, Any]], **kw: Any) -> FakeNvml:
        module = FakeNvml(gpus, **kw)
        monkeypatch.setitem(sys.modules, "pynvml", module)
        return module

    return install


def test_nvml_counter_mode_sums_gpus(fake_nvml: Any) -> None:
    nv = fake_nvml(
        [
            {"name": "H100", "energy_mj": 1_000_000, "power_mw": 300_000},
            {"name": "H100", "energy_mj": 2_000_000, "power_mw": 200_000},
            {"name": "other", "energy_mj": 9, "power_mw": 9},
        ]
    )
    meter = NvmlMeter(EnergyConfig(gpu_indices=(0, 1)))
    assert meter.is_available().ok
    assert meter.mode == "counter" and meter.name == "nvml:0,1"
    r = meter.read()
    assert r.energy_j == pytest.approx(3000.0) and r.power_w == pytest.approx(500.0)
    nv.gpus[0]["energy_mj"] += 1500
    assert meter.read().energy_j == pytest.approx(3001.5)
    meter.close()
    assert nv.shutdowns == 1


def test_nvml_polling_mode_for_pre_volta(fake_nvml: Any) -> None:
    fake_nvml([{"name": "P100", "energy_mj": None, "power_mw": 150_000}])
    meter = NvmlMeter(EnergyConfig())
    assert meter.is_available().ok and meter.mode == "power"
    r = meter.read()
    assert r.energy_j is None and r.power_w == pytest.approx(150.0)
    forced = NvmlMeter(EnergyConfig(nvml_mode="counter"))
    assert "no energy counter" in forced.is_available().reason


def test_nvml_power_mode_can_be_forced(fake_nvml: Any) -> None:
    fake_nvml([{"name": "A100", "energy_mj": 5, "power_mw": 100_000}])
    meter = NvmlMeter(EnergyConfig(nvml_mode="power"))
    assert meter.is_available().ok and meter.mode == "power"
    assert meter.read().energy_j is None


def test_nvml_not_supported_on_jetson_orin(fake_nvml: Any) -> None:
    fake_nvml([{"name": "Orin (nvgpu)", "energy_mj": None, "power_mw": None}])
    availability = NvmlMeter(EnergyConfig()).is_available()
    assert not availability.ok and "NOT_SUPPORTED" in availability.reason and "jetson" in availability.reason


def test_nvml_init_failure_and_bad_index(fake_nvml: Any) -> None:
    fake_nvml([], init_error=12)
    assert "NVML init failed" in NvmlMeter(EnergyConfig()).is_available().reason
    fake_nvml([{"name": "H100", "energy_mj": 1, "power_mw": 1}])
    assert "out of range" in NvmlMeter(EnergyConfig(gpu_indices=(3,))).is_available().reason


def test_nvml_visible_devices_default(fake_nvml: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml([{"name": f"g{i}", "energy_mj": 1000 * (i + 1), "power_mw": 1} for i in range(4)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    meter = NvmlMeter(EnergyConfig())
    assert meter.is_available().ok and meter.name == "nvml:2,3"
    assert meter.read().energy_j == pytest.approx(3.0 + 4.0)


def test_nvml_read_failure_raises_meter_error(fake_nvml: Any) -> None:
    nv = fake_nvml([{"name": "H100", "energy_mj": 1, "power_mw": 1}])
    meter = NvmlMeter(EnergyConfig())
    assert meter.is_available().ok
    nv.gpus[0]["fail"] = True
    with pytest.raises(MeterError):
        meter.read()


def test_nvml_absent_here_without_fake() -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("a real NVIDIA driver is present")
    except Exception:
        pass
    assert not NvmlMeter(EnergyConfig()).is_available().ok


# ---------------------------------------------------------------- jtop (fake jtop module)
def test_jtop_meter_with_socket_and_fake_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = EnergyConfig(sysfs_root=str(tmp_path))
    assert "no jtop service socket" in JtopMeter(cfg).is_available().reason
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "jtop.sock").write_text("")
    monkeypatch.setitem(sys.modules, "jtop", None)  # import fails: not installed
    assert "not installed" in JtopMeter(cfg).is_available().reason

    class FakeClient:
        def __init__(self, interval: float) -> None:
            self.interval = interval
            self.closed = False
            self.power = {
                "rail": {"VDD_GPU_SOC": {"power": 2400}, "VDD_CPU_CV": {"power": 400}},
                "tot": {"power": 2800},
            }

        def start(self) -> None:
            pass

        def close(self) -> None:
            self.closed = True

    module = types.ModuleType("jtop")
    module.jtop = FakeClient  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "jtop", module)
    meter = JtopMeter(cfg)
    assert meter.is_available().ok
    assert meter.read().power_w == pytest.approx(2.8)
    rails = JtopMeter(EnergyConfig(sysfs_root=str(tmp_path), jetson_rails=("VDD_GPU_SOC",)))
    assert rails.read().power_w == pytest.approx(2.4)


# ---------------------------------------------------------------- tegrastats subprocess
def _fake_tegrastats(tmp_path: Path, lines: list[str]) -> Path:
    script = tmp_path / "tegrastats"
    script.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""
            import sys, time
            assert sys.argv[1:3] == ["--interval", "50"], sys.argv
            lines = {lines!r}
            i = 0
            while True:
                print(lines[i % len(lines)], flush=True)
                i += 1
                time.sleep(0.05)
            """
        )
    )
    script.chmod(0o755)
    return script


def test_tegrastats_meter_reads_subprocess(tmp_path: Path) -> None:
    script = _fake_tegrastats(tmp_path, [ISSUE_LINE])
    meter = TegrastatsMeter(EnergyConfig(tegrastats_path=str(script), tegrastats_interval_ms=50))
    try:
        assert meter.is_available().ok
        assert meter.name == "tegrastats:VDD_IN"
        assert meter.read().power_w == pytest.approx(5.704)
        assert meter.update_period_s == pytest.approx(0.05)
    finally:
        meter.close()
    assert meter._proc is None


def test_tegrastats_missing_binary() -> None:
    reason = TegrastatsMeter(EnergyConfig(tegrastats_path="no-such-tegrastats-binary")).is_available().reason
    assert "not found" in reason


# ---------------------------------------------------------------- estimate and replay
def test_estimate_meter_model() -> None:
    clock = iter([100.0, 102.0])
    cpu = iter([10.0, 10.5])
    meter = EstimateMeter(
        EnergyConfig(estimate_base_w=4.0, estimate_core_w=20.0),
        clock=lambda: next(clock),
        cpu_clock=lambda: next(cpu),
    )
    reading = meter.read()
    assert reading.energy_j == pytest.approx(4.0 * 2.0 + 20.0 * 0.5)
    assert meter.source == "estimated" and meter.name == "estimate:cpu"


def test_replay_is_deterministic_and_exact() -> None:
    trace_path = FIXTURES / "orin_nano_trace.csv"
    trace, rails = load_trace(trace_path)
    assert rails == ["VDD_IN"] and trace.duration_s == pytest.approx(6.0)
    times = [0.0, 0.05, 0.37, 1.2, 3.3, 6.0, 6.5, 12.0]

    def run() -> list[tuple[float | None, float | None]]:
        ticks = iter([1000.0 + t for t in times])
        meter = ReplayMeter(EnergyConfig(replay_trace=str(trace_path)), clock=lambda: next(ticks))
        return [(r.energy_j, r.power_w) for r in (meter.read() for _ in times)]

    a, b = run(), run()
    assert a == b
    # Energy over one full pass equals the trapezoid integral of the CSV's VDD_IN column.
    rows = [ln.split(",") for ln in trace_path.read_text().splitlines() if ln and ln[0].isdigit()]
    t = [float(r[0]) for r in rows]
    p = [float(r[1]) / 1000 for r in rows]
    expected = sum((t[i + 1] - t[i]) * (p[i] + p[i + 1]) / 2 for i in range(len(t) - 1))
    assert a[5][0] == pytest.approx(expected)
    assert a[7][0] == pytest.approx(2 * expected)  # looped twice
    assert a[1][1] == pytest.approx((p[0] + p[1]) / 2)  # linear between rows


def test_replay_reports_replayed_and_validates(tmp_path: Path) -> None:
    meter = ReplayMeter(EnergyConfig(replay_trace=str(FIXTURES / "orin_nano_trace.csv")))
    assert meter.is_available().ok and meter.source == "replayed"
    bad = tmp_path / "bad.csv"
    bad.write_text("t,VDD_IN_mw\n0,1\n1,2\n")
    assert "time_s" in ReplayMeter(EnergyConfig(replay_trace=str(bad))).is_available().reason
    assert "no trace" in ReplayMeter(EnergyConfig()).is_available().reason


# ---------------------------------------------------------------- factory and `joulecap meters`
def test_auto_on_this_machine_is_estimate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    meter = create_meter(EnergyConfig(sysfs_root=str(tmp_path), tegrastats_path="no-such-tegrastats"))
    if meter.name.startswith("nvml"):
        pytest.skip("a real NVIDIA GPU is present")
    assert meter.name == "estimate:cpu" and meter.source == "estimated"
    for name in ("nvml", "jetson", "jtop", "tegrastats", "rapl"):
        assert f"meter {name} skipped" in caplog.text


def test_auto_detects_jetson_from_sysfs(orin_nano_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML library absent, as on Jetson containers
    meter = create_meter(EnergyConfig(sysfs_root=str(orin_nano_root)))
    assert meter.name == "jetson:VDD_IN"


def test_explicit_unavailable_falls_back_with_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    meter = create_meter(EnergyConfig(meter="rapl", sysfs_root=str(tmp_path)))
    assert isinstance(meter, EstimateMeter)
    assert "rapl" in meter.describe()["fallback_reason"]
    assert "falling back" in caplog.text
    with pytest.raises(ValueError, match="unknown meter"):
        create_meter(EnergyConfig(meter="bogus"))


def test_every_backend_satisfies_the_protocol() -> None:
    from joulecap.runtime.energy.factory import METERS

    for name, ctor in METERS.items():
        meter = ctor(EnergyConfig())
        assert isinstance(meter, Meter), name
        assert meter.source in ("measured", "estimated", "replayed")
        meter.close()
    assert AUTO_ORDER[-1] == "estimate"


def test_probe_and_meters_command(agx_orin_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    cfg = EnergyConfig(
        sysfs_root=str(agx_orin_root),
        tegrastats_path="no-such-tegrastats",
        replay_trace=str(FIXTURES / "orin_nano_trace.csv"),
    )
    probes = {p.name: p for p in probe_meters(cfg, probe_interval_s=0.01)}
    assert probes["jetson"].availability.ok and probes["jetson"].power_w == pytest.approx(7.5)
    assert probes["estimate"].availability.ok and probes["estimate"].power_w is not None
    assert probes["replay"].availability.ok and probes["replay"].source == "replayed"
    assert not probes["nvml"].availability.ok and probes["nvml"].reading is None
    out = io.StringIO()
    assert meters_command(cfg, out) == 0
    text = out.getvalue()
    assert "*  jetson" in text and "nvidia-ml-py is not installed" in text and "no RAPL" in text


def test_meters_command_on_this_machine(tmp_path: Path) -> None:
    out = io.StringIO()
    meters_command(EnergyConfig(sysfs_root=str(tmp_path), tegrastats_path="no-such-tegrastats"), out)
    text = out.getvalue()
    if "nvml        ok" in text:
        pytest.skip("a real NVIDIA GPU is present")
    assert "*  estimate" in text and "estimated" in text
    for why in ("NVML", "no INA3221 rails", "no RAPL package domains"):
        assert why in text


def test_estimate_meter_counts_child_process_cpu() -> None:
    # vLLM computes in child processes; the estimate must see their CPU time.
    import subprocess
    import sys

    from joulecap.runtime.energy.estimate import ProcessTreeCpuClock

    clock = ProcessTreeCpuClock()
    before = clock()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt=time.process_time()\nwhile time.process_time()-t<0.5: pass\ntime.sleep(5)",
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while clock() - before < 0.4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert clock() - before >= 0.4
    finally:
        child.kill()
        child.wait()
    after_exit = clock()
    assert after_exit >= before + 0.4  # an exited child's time is kept: monotonic
