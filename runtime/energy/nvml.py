"""NVIDIA GPU energy through NVML (the `nvidia-ml-py` package, imported as `pynvml` lazily).

Two modes, chosen per `EnergyConfig.nvml_mode` (`auto` prefers the counter):

- **counter**: `nvmlDeviceGetTotalEnergyConsumption` (mJ since the driver loaded; Volta and
  newer). The counter updates about every 100 ms, so windows shorter than that are
  interpolated by the monitor from the power readings taken alongside.
- **power**: `nvmlDeviceGetPowerUsage` (mW) polled by the sampler and integrated with the
  trapezoid rule (older GPUs without the counter). On A100/H100 this value is a ~1 s average,
  so short windows are smoothed.

Several GPUs (`EnergyConfig.gpu_indices`; by default those in a numeric
`CUDA_VISIBLE_DEVICES`, else all) are summed. On Jetson Orin NVML loads but power queries
return NOT_SUPPORTED: the meter is then unavailable with that reason and the factory moves on
to the Jetson meters. NVML indices are physical indices (they ignore `CUDA_VISIBLE_DEVICES`
reordering by UUID/MIG; give `--gpu-indices` explicitly in such setups).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from joulecap.runtime.energy.base import Availability, MeterError, MeterReading
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.types import EnergySource

COUNTER_PERIOD_S = 0.1
"""NVML's total-energy counter (and power value) refresh period, approximately."""


def _visible_indices() -> tuple[int, ...] | None:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or not env.strip():
        return None
    parts = [p.strip() for p in env.split(",") if p.strip()]
    if all(p.isdigit() for p in parts):
        return tuple(int(p) for p in parts)
    return None  # UUIDs or MIG ids: fall back to all GPUs


def _is_not_supported(pynvml: ModuleType, exc: BaseException) -> bool:
    return getattr(exc, "value", None) == getattr(pynvml, "NVML_ERROR_NOT_SUPPORTED", 3)


@dataclass(frozen=True)
class _Gpu:
    index: int
    name: str
    handle: Any
    has_counter: bool


class NvmlMeter:
    """Summed energy of one or more NVIDIA GPUs.

    Args:
        config: Supplies `gpu_indices` and `nvml_mode`.

    """

    source: EnergySource = "measured"
    update_period_s: float = COUNTER_PERIOD_S

    def __init__(self, config: EnergyConfig) -> None:
        self.requested = tuple(config.gpu_indices)
        self.mode_setting = config.nvml_mode
        self.mode: str | None = None
        self.name = "nvml"
        self._nvml: ModuleType | None = None
        self._gpus: list[_Gpu] | None = None
        self._power_ok = True

    def _import(self) -> ModuleType:
        try:
            return importlib.import_module("pynvml")
        except ImportError as exc:
            raise MeterError(f"nvidia-ml-py is not installed (pip install nvidia-ml-py): {exc}") from exc

    def _open(self) -> list[_Gpu]:
        if self._gpus is not None:
            return self._gpus
        pynvml = self._import()
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise MeterError(f"NVML init failed ({exc}): no NVIDIA driver or GPU") from exc
        self._nvml = pynvml
        try:
            gpus = self._probe(pynvml)
        except BaseException:
            self.close()
            raise
        self._gpus = gpus
        return gpus

    def _probe(self, pynvml: ModuleType) -> list[_Gpu]:
        count = int(pynvml.nvmlDeviceGetCount())
        if count == 0:
            raise MeterError("NVML found no GPUs")
        indices = self.requested or _visible_indices() or tuple(range(count))
        bad = [i for i in indices if i >= count]
        if bad:
            raise MeterError(f"GPU indices {bad} out of range: NVML sees {count} GPU(s)")
        gpus = []
        for i in indices:
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            raw = pynvml.nvmlDeviceGetName(handle)
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            has_counter = True
            try:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            except pynvml.NVMLError as exc:
                if not _is_not_supported(pynvml, exc):
                    raise MeterError(f"GPU {i} ({name}): energy counter query failed: {exc}") from exc
                has_counter = False
            try:
                pynvml.nvmlDeviceGetPowerUsage(handle)
            except pynvml.NVMLError as exc:
                if not _is_not_supported(pynvml, exc):
                    raise MeterError(f"GPU {i} ({name}): power query failed: {exc}") from exc
                self._power_ok = False
                if not has_counter:
                    raise MeterError(
                        f"GPU {i} ({name}): NVML energy and power queries are NOT_SUPPORTED "
                        "(e.g. Jetson Orin's integrated GPU; use the jetson meter)"
                    ) from exc
            gpus.append(_Gpu(i, name, handle, has_counter))
        all_counter = all(g.has_counter for g in gpus)
        if self.mode_setting == "counter" and not all_counter:
            missing = [g.index for g in gpus if not g.has_counter]
            raise MeterError(f"nvml_mode=counter but GPUs {missing} have no energy counter (pre-Volta)")
        if self.mode_setting == "power" and not self._power_ok:
            raise MeterError("nvml_mode=power but a GPU does not report power")
        if self.mode_setting == "counter" or (self.mode_setting == "auto" and all_counter):
            self.mode = "counter"
        else:
            self.mode = "power"
        if self.mode == "power" and not self._power_ok:
            raise MeterError("a GPU has no energy counter and another no power reading; cannot sum them")
        self.name = "nvml:" + ",".join(str(g.index) for g in gpus)
        return gpus

    def is_available(self) -> Availability:
        """Load NVML, resolve the GPUs and check which queries they support."""
        try:
            gpus = self._open()
        except MeterError as exc:
            return Availability.no(str(exc))
        except Exception as exc:
            return Availability.no(f"NVML probe failed: {type(exc).__name__}: {exc}")
        names = ", ".join(f"{g.index}:{g.name}" for g in gpus)
        return Availability.yes(f"{self.mode} mode on {names}")

    def read(self) -> MeterReading:
        """Counter mode: summed energy (J) plus power (W) when reported; power mode: power only."""
        gpus = self._open()
        pynvml = self._nvml
        assert pynvml is not None
        t = time.monotonic()
        try:
            power_w = (
                sum(int(pynvml.nvmlDeviceGetPowerUsage(g.handle)) for g in gpus) / 1000.0
                if self._power_ok
                else None
            )
            if self.mode == "counter":
                energy_mj = sum(int(pynvml.nvmlDeviceGetTotalEnergyConsumption(g.handle)) for g in gpus)
                return MeterReading(t_s=t, energy_j=energy_mj / 1000.0, power_w=power_w)
        except pynvml.NVMLError as exc:
            raise MeterError(f"NVML read failed: {exc}") from exc
        return MeterReading(t_s=t, power_w=power_w)

    def describe(self) -> dict[str, object]:
        """GPUs, mode and counter period."""
        facts: dict[str, object] = {
            "name": self.name,
            "source": self.source,
            "kind": "counter" if self.mode == "counter" else "power",
            "mode": self.mode or self.mode_setting,
            "update_period_s": self.update_period_s,
        }
        if self._gpus is not None:
            facts["gpus"] = {str(g.index): g.name for g in self._gpus}
        return facts

    def close(self) -> None:
        """Shut NVML down (reference counted by the driver library)."""
        pynvml, self._nvml = self._nvml, None
        self._gpus = None
        if pynvml is not None:
            # Shutting down a lost driver must not raise at exit.
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
