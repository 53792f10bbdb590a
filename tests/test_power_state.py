"""Power state per request: Jetson sysfs trees (Orin Nano, NX, AGX Orin layouts), jtop, a faked pynvml."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.power_readers import (
    JetsonPowerReader,
    NullPowerReader,
    NvmlPowerReader,
    create_power_reader,
)
from joulecap.runtime.energy.power_state import (
    UNKNOWN,
    PowerState,
    PowerStateCache,
    choose_profile,
    create_power_state_cache,
    profile_key_suffix,
)

# nvpmodel modes as L4T 36 ships them per module (the ids and names the conf files define).
LAYOUTS: dict[str, dict[str, Any]] = {
    "orin_nano": {"modes": {0: "15W", 1: "7W", 2: "MAXN_SUPER"}, "cpus": 6, "gpu_max_hz": 624_750_000},
    "orin_nx": {"modes": {0: "MAXN", 1: "10W", 2: "15W", 3: "25W"}, "cpus": 8, "gpu_max_hz": 918_000_000},
    "agx_orin": {
        "modes": {0: "MAXN", 1: "15W", 2: "30W", 3: "50W"},
        "cpus": 12,
        "gpu_max_hz": 1_300_500_000,
        "emc_hz": 3_199_000_000,
    },
}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def build_jetson_tree(root: Path, layout: str, *, mode: int | None = 0, pinned: bool = False) -> Path:
    """A sysfs/etc/var tree with `layout`'s nvpmodel modes, GPU devfreq, cpufreq and thermal zones."""
    spec = LAYOUTS[layout]
    conf = ["< PARAM TYPE=FILE NAME=CPU_ONLINE >"]
    for i, name in spec["modes"].items():
        conf += [f"< POWER_MODEL ID={i} NAME={name} >", "CPU_ONLINE CORE_0 1"]
    _write(root / "etc/nvpmodel.conf", "\n".join(conf) + "\n")
    if mode is not None:
        _write(root / "var/lib/nvpmodel/status", f"pmode:{mode:04d} fmode:quiet\n")
    gpu = root / "sys/class/devfreq/17000000.ga10b"
    gpu_max = spec["gpu_max_hz"]
    _write(gpu / "cur_freq", f"{gpu_max}\n")
    _write(gpu / "max_freq", f"{gpu_max}\n")
    _write(gpu / "min_freq", f"{gpu_max if pinned else 306_000_000}\n")
    for c in range(spec["cpus"]):
        d = root / f"sys/devices/system/cpu/cpu{c}/cpufreq"
        _write(d / "scaling_cur_freq", f"{1_510_400 - c * 1000}\n")
        _write(d / "scaling_max_freq", "1510400\n")
        _write(d / "scaling_min_freq", "1510400\n" if pinned else "115200\n")
    for i, (kind, mc) in enumerate([("cpu-thermal", 46531), ("gpu-thermal", 48218), ("tj-thermal", 48843)]):
        _write(root / f"sys/class/thermal/thermal_zone{i}/type", kind + "\n")
        _write(root / f"sys/class/thermal/thermal_zone{i}/temp", f"{mc}\n")
    if "emc_hz" in spec:
        _write(root / "sys/kernel/debug/bpmp/debug/clk/emc/rate", f"{spec['emc_hz']}\n")
    return root


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_jetson_layouts_read_mode_clocks_and_temperatures(tmp_path: Path, layout: str) -> None:
    spec = LAYOUTS[layout]
    mode = max(spec["modes"])
    root = build_jetson_tree(tmp_path, layout, mode=mode)
    reader = JetsonPowerReader(str(root))
    assert reader.is_available()[0]
    state = reader.read()
    assert state.kind == "jetson"
    assert state.power_mode_id == mode and state.power_mode == spec["modes"][mode]
    assert state.jetson_clocks is False  # DVFS leaves min below max
    assert state.gpu_clock_mhz == pytest.approx(spec["gpu_max_hz"] / 1e6)
    assert state.cpu_clock_mhz == pytest.approx(1510.4)  # the fastest core
    assert state.cpu_temp_c == pytest.approx(46.531) and state.gpu_temp_c == pytest.approx(48.218)
    if "emc_hz" in spec:
        assert state.emc_clock_mhz == pytest.approx(spec["emc_hz"] / 1e6)
    else:
        assert state.emc_clock_mhz is None  # debugfs absent: unknown, not 0
    assert profile_key_suffix(state) == f"nvp{mode}-{spec['modes'][mode]}"
    row = state.ledger_fields()
    assert row["power_mode"] == spec["modes"][mode] and row["jetson_clocks"] == 0


def test_jetson_clocks_detected_when_min_equals_max(tmp_path: Path) -> None:
    root = build_jetson_tree(tmp_path, "agx_orin", mode=0, pinned=True)
    state = JetsonPowerReader(str(root)).read()
    assert state.jetson_clocks is True
    assert profile_key_suffix(state) == "nvp0-MAXN-clocks"
    # One CPU still under DVFS: not jetson_clocks.
    (root / "sys/devices/system/cpu/cpu3/cpufreq/scaling_min_freq").write_text("115200\n")
    assert JetsonPowerReader(str(root)).read().jetson_clocks is False


def test_missing_nvpmodel_file_leaves_mode_null_and_says_why(tmp_path: Path) -> None:
    root = build_jetson_tree(tmp_path, "orin_nano", mode=None)
    state = JetsonPowerReader(str(root)).read()
    assert state.power_mode is None and state.power_mode_id is None
    assert any("nvpmodel" in e for e in state.errors)
    assert state.gpu_clock_mhz is not None  # the rest is still read
    assert profile_key_suffix(state) == ""  # unknown mode: the mode-less profile


def test_mode_from_jtop_when_status_file_missing(tmp_path: Path) -> None:
    root = build_jetson_tree(tmp_path, "orin_nx", mode=None)
    _write(root / "run/jtop.sock", "")

    class Nvp:
        id = 3
        name = "25W"

    client = types.SimpleNamespace(nvpmodel=Nvp(), jetson_clocks=False, close=lambda: None)
    state = JetsonPowerReader(str(root), jtop_factory=lambda: client).read()
    assert (state.power_mode_id, state.power_mode) == (3, "25W")


def test_unnamed_mode_keeps_its_id(tmp_path: Path) -> None:
    root = build_jetson_tree(tmp_path, "orin_nano", mode=7)
    state = JetsonPowerReader(str(root)).read()
    assert state.power_mode_id == 7 and state.power_mode is None
    assert profile_key_suffix(state) == "nvp7"
    assert any("not named" in e for e in state.errors)


# ---------------------------------------------------------------- NVML
class FakeNvml(types.ModuleType):
    """`pynvml` with the power-state queries; `fail` names queries that raise."""

    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0
    nvmlClocksThrottleReasonGpuIdle = 0x1
    nvmlClocksThrottleReasonSwPowerCap = 0x4
    nvmlClocksThrottleReasonHwThermalSlowdown = 0x40

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[dict[str, Any]], fail: tuple[str, ...] = ()) -> None:
        super().__init__("pynvml")
        self.gpus, self.fail, self.shutdowns = gpus, fail, 0

    def _check(self, what: str) -> None:
        if what in self.fail:
            raise self.NVMLError(f"NVML error on {what}")

    def nvmlInit(self) -> None:
        self._check("init")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return self.gpus[i]

    def nvmlDeviceGetClockInfo(self, h: dict[str, Any], clock: int) -> int:
        self._check("clock")
        assert clock == self.NVML_CLOCK_SM
        return int(h["sm_mhz"])

    def nvmlDeviceGetTemperature(self, h: dict[str, Any], sensor: int) -> int:
        self._check("temperature")
        return int(h["temp_c"])

    def nvmlDeviceGetEnforcedPowerLimit(self, h: dict[str, Any]) -> int:
        self._check("limit")
        return int(h["limit_mw"])

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: dict[str, Any]) -> int:
        self._check("throttle")
        return int(h["throttle"])


H100 = {"sm_mhz": 1980, "temp_c": 61, "limit_mw": 700_000, "throttle": 0x4}


def test_nvml_reads_clock_limit_temperature_and_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu1 = {**H100, "throttle": 0x40}
    nv = FakeNvml([H100, gpu1])
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    reader = NvmlPowerReader((0, 1))
    assert reader.is_available()[0]
    state = reader.read()
    assert state.gpu_clock_mhz == 1980.0 and state.gpu_temp_c == 61.0
    assert state.power_limit_w == pytest.approx(1400.0)  # summed over the GPUs read
    assert state.throttle_reasons == ("hw_thermal", "sw_power_cap")
    assert state.power_mode == "1400W-limit" and profile_key_suffix(state) == "pl1400"
    assert state.ledger_fields()["throttle_reasons"] == "hw_thermal,sw_power_cap"
    reader.close()
    assert nv.shutdowns == 1


def test_nvml_that_raises_on_clock_queries_nulls_only_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([H100], fail=("clock", "throttle")))
    state = NvmlPowerReader().read()
    assert state.gpu_clock_mhz is None and state.throttle_reasons is None
    assert state.power_limit_w == pytest.approx(700.0) and state.gpu_temp_c == 61.0
    assert any("SM clock" in e for e in state.errors) and any("throttle" in e for e in state.errors)


def test_nvml_absent_or_failing_init(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    ok, why = NvmlPowerReader().is_available()
    assert not ok and "NVML unavailable" in why
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([H100], fail=("init",)))
    state = NvmlPowerReader().read()
    assert state.kind == "nvml" and state.power_limit_w is None and state.errors


def test_auto_picks_jetson_then_nvml_then_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert isinstance(create_power_reader("auto", sysfs_root=str(tmp_path)), NullPowerReader)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([H100]))
    assert isinstance(create_power_reader("auto", sysfs_root=str(tmp_path)), NvmlPowerReader)
    build_jetson_tree(tmp_path, "orin_nano")
    assert isinstance(create_power_reader("auto", sysfs_root=str(tmp_path)), JetsonPowerReader)
    cache = create_power_state_cache(EnergyConfig(power_state="none", sysfs_root=str(tmp_path)))
    assert cache.current() == UNKNOWN
    with pytest.raises(ValueError, match="power_state_ttl_s"):
        EnergyConfig(power_state_ttl_s=-1)


# ---------------------------------------------------------------- cache and profiles
class ScriptedReader:
    kind = "jetson"

    def __init__(self) -> None:
        self.state = PowerState(kind="jetson", power_mode="15W", power_mode_id=0)
        self.reads = 0
        self.raise_next = False

    def is_available(self) -> tuple[bool, str]:
        return True, ""

    def read(self) -> PowerState:
        self.reads += 1
        if self.raise_next:
            raise OSError("sysfs went away")
        return self.state

    def close(self) -> None:
        pass


def test_cache_rereads_after_ttl_and_counts_mode_changes() -> None:
    now = [0.0]
    reader = ScriptedReader()
    cache = PowerStateCache(reader, ttl_s=1.0, clock=lambda: now[0])
    assert cache.current().power_mode == "15W"
    reader.state = PowerState(kind="jetson", power_mode="7W", power_mode_id=1)
    now[0] = 0.5
    assert cache.current().power_mode == "15W" and reader.reads == 1  # cached
    now[0] = 1.5
    assert cache.current().power_mode == "7W" and cache.mode_changes == 1
    reader.state = PowerState(kind="jetson", power_mode="7W", power_mode_id=1, gpu_clock_mhz=300.0)
    now[0] = 3.0
    cache.current()
    assert cache.mode_changes == 1  # a clock change is not a mode change
    reader.raise_next = True
    now[0] = 5.0
    broken = cache.current()
    assert broken.power_mode is None and "sysfs went away" in broken.errors[0]


def test_started_cache_refreshes_in_the_background() -> None:
    reader = ScriptedReader()
    cache = PowerStateCache(reader, ttl_s=0.02)
    cache.start()
    try:
        assert cache.current().power_mode == "15W"
        reads = reader.reads
        reader.state = PowerState(kind="jetson", power_mode="7W", power_mode_id=1)
        deadline = time.monotonic() + 5
        while cache.current().power_mode != "7W" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cache.current().power_mode == "7W" and reader.reads > reads
        assert cache.mode_changes == 1
    finally:
        cache.close()
    stopped_at = reader.reads
    time.sleep(0.1)
    assert reader.reads == stopped_at  # the thread is gone


def test_choose_profile_uses_the_mode_or_flags_it() -> None:
    state = PowerState(kind="jetson", power_mode="15W", power_mode_id=2)
    base = "tinyvqa|cuda|bfloat16"
    exact = choose_profile(base, state, [base, f"{base}@nvp2-15W"])
    assert exact == choose_profile(base, state, [f"{base}@nvp2-15W"])
    assert exact.key == f"{base}@nvp2-15W" and exact.exact and not exact.flag
    other = choose_profile(base, state, [base, f"{base}@nvp0-MAXN"])
    assert other.key == base and not other.exact and "nvp2-15W" in other.flag
    stems = choose_profile("tiny__cpu__bf16", state, ["tiny__cpu__bf16__nvp2-15W"], sep="__")
    assert stems.key == "tiny__cpu__bf16__nvp2-15W" and stems.exact
    unknown = choose_profile(base, UNKNOWN, [base])
    assert unknown.key == base and unknown.exact and not unknown.flag
