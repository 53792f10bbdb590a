"""Energy measurement configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

MAX_SAMPLE_HZ = 100.0
"""Highest background sampling rate accepted (sensors rarely update faster)."""


def _meters() -> list[str]:
    from joulecap.runtime.energy.factory import METERS

    return ["auto", *sorted(METERS)]


@dataclass(frozen=True)
class EnergyConfig:
    """How energy is measured or estimated."""

    meter: str = field(default="auto", metadata={"choices": _meters})
    """Meter backend: `auto` (detect), `nvml`, `jetson`, `jtop`, `tegrastats`, `rapl`, `estimate`,
    `replay`."""
    sample_hz: float = 10.0
    """Background sampler rate (readings per second), at most 100."""
    estimate_base_w: float = 5.0
    """Estimate meter: constant power attributed to the device while a request runs."""
    estimate_core_w: float = 15.0
    """Estimate meter: watts per fully busy CPU core of this process."""
    gpu_indices: tuple[int, ...] = ()
    """NVML: GPU indices whose energy is summed; empty = the GPUs in a numeric
    CUDA_VISIBLE_DEVICES, else every GPU NVML sees."""
    nvml_mode: Literal["auto", "counter", "power"] = "auto"
    """NVML: `counter` reads the total-energy counter (Volta+), `power` polls power and integrates;
    `auto` uses the counter when every selected GPU supports it."""
    sysfs_root: str = "/"
    """Root under which `sys/...` and `run/jtop.sock` are looked up (tests point it at a temp tree)."""
    jetson_rails: tuple[str, ...] = ()
    """Jetson: power rails summed into the total; empty = `VDD_IN` when present (Orin Nano/NX),
    else every connected rail (AGX Orin)."""
    tegrastats_path: str = "tegrastats"
    """tegrastats executable (name on PATH or a path)."""
    tegrastats_interval_ms: int = 100
    """tegrastats: `--interval` in milliseconds."""
    jtop_interval_s: float = 0.5
    """jtop: update interval requested from the jetson-stats service."""
    replay_trace: str | None = None
    """Replay meter: CSV trace with a `time_s` column and one `<RAIL>_mw` column per rail."""
    replay_loop: bool = True
    """Replay meter: start the trace over when it ends (else hold the last power)."""
    idle_baseline_s: float = 0.5
    """How long the monitor measures idle power when it starts (0 skips it)."""
    idle_refresh_s: float = 2.0
    """Shortest idle gap between requests used to refresh the idle baseline."""
    sample_history_s: float = 600.0
    """How many seconds of samples the sampler keeps for window integration."""
    power_state: Literal["auto", "jetson", "nvml", "none"] = "auto"
    """Where each request's power state (nvpmodel mode, clocks, power limit) is read: `auto`
    tries the Jetson sysfs tree, then NVML; `none` records no power state."""
    power_state_ttl_s: float = 1.0
    """Longest a read power state is reused before it is read again (0: on every request)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sample_hz) and 0.0 < self.sample_hz <= MAX_SAMPLE_HZ):
            raise ValueError(f"sample_hz must be in (0, {MAX_SAMPLE_HZ:g}], got {self.sample_hz}")
        for name in ("estimate_base_w", "estimate_core_w", "idle_baseline_s", "idle_refresh_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.power_state_ttl_s) and self.power_state_ttl_s >= 0.0):
            raise ValueError(f"power_state_ttl_s must be a finite number >= 0, got {self.power_state_ttl_s}")
        if self.tegrastats_interval_ms <= 0:
            raise ValueError(f"tegrastats_interval_ms must be > 0, got {self.tegrastats_interval_ms}")
        if not self.jtop_interval_s > 0:
            raise ValueError(f"jtop_interval_s must be > 0, got {self.jtop_interval_s}")
        if not self.sample_history_s > 0:
            raise ValueError(f"sample_history_s must be > 0, got {self.sample_history_s}")
        if any(i < 0 for i in self.gpu_indices):
            raise ValueError(f"gpu_indices must be >= 0, got {self.gpu_indices}")
