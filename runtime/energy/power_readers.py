"""Power-state readers: a Jetson's sysfs (+ jtop), NVIDIA GPUs through NVML, or none.

What each reads and from where is described in `power_state.py`; nothing here touches hardware
before `is_available()` or `read()` is called.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from types import ModuleType
from typing import Any

from joulecap.runtime.energy.power_state import (
    CPU_GLOB,
    EMC_RATE_PATHS,
    GPU_DEVFREQ_GLOBS,
    JTOP_SOCKET,
    NVPMODEL_CONF,
    NVPMODEL_STATUS,
    PMODE_RE,
    POWER_MODEL_RE,
    THERMAL_GLOB,
    THROTTLE_REASONS,
    UNKNOWN,
    PowerState,
    PowerStateKind,
    PowerStateReader,
)

log = logging.getLogger(__name__)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().strip()


def _read_number(path: str) -> float:
    return float(_read_text(path).split()[0])


class JetsonPowerReader:
    """nvpmodel mode, `jetson_clocks`, clocks and temperatures from a Jetson's sysfs (+ jtop).

    Args:
        sysfs_root: Root under which `sys/...`, `etc/...`, `var/...` and `run/jtop.sock` live.
        jtop_factory: Builds a started jtop client (tests pass a fake); default imports `jtop`
            only when the socket exists and the status file does not say the mode.

    """

    kind: PowerStateKind = "jetson"

    def __init__(self, sysfs_root: str = "/", jtop_factory: Callable[[], Any] | None = None) -> None:
        self.root = sysfs_root
        self._jtop_factory = jtop_factory
        self._jtop: Any = None
        self._modes: dict[int, str] | None = None

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _gpu_devfreq(self) -> str | None:
        for pattern in GPU_DEVFREQ_GLOBS:
            found = sorted(glob.glob(self._p(pattern)))
            if found:
                return found[0]
        return None

    def is_available(self) -> tuple[bool, str]:
        """A Jetson: an nvpmodel status file, a Tegra GPU devfreq node or the jtop socket."""
        if os.path.isfile(self._p(NVPMODEL_STATUS)) or self._gpu_devfreq() is not None:
            return True, "jetson sysfs"
        if os.path.exists(self._p(JTOP_SOCKET)):
            return True, "jtop socket"
        return False, f"no {NVPMODEL_STATUS}, Tegra GPU devfreq node or jtop socket under {self.root}"

    def _mode_names(self) -> dict[int, str]:
        if self._modes is None:  # the conf file does not change while the device runs
            names: dict[int, str] = {}
            with contextlib.suppress(OSError):
                for m in POWER_MODEL_RE.finditer(_read_text(self._p(NVPMODEL_CONF))):
                    names[int(m.group(1))] = m.group(2)
            self._modes = names
        return self._modes

    def _client(self) -> Any:
        if self._jtop is None and os.path.exists(self._p(JTOP_SOCKET)):
            if self._jtop_factory is not None:
                self._jtop = self._jtop_factory()
            else:
                module = importlib.import_module("jtop")
                client = module.jtop()
                client.start()
                self._jtop = client
        return self._jtop

    def read(self) -> PowerState:
        """Read every field this Jetson exposes; missing files leave None and a reason."""
        errors: list[str] = []
        mode_id: int | None = None
        mode_name: str | None = None
        try:
            m = PMODE_RE.search(_read_text(self._p(NVPMODEL_STATUS)))
            if m is None:
                errors.append(f"{NVPMODEL_STATUS}: no pmode field")
            else:
                mode_id = int(m.group(1))
                mode_name = self._mode_names().get(mode_id)
                if mode_name is None:
                    errors.append(f"nvpmodel mode {mode_id} not named in {NVPMODEL_CONF}")
        except OSError as exc:
            errors.append(f"nvpmodel mode unreadable: {exc.strerror or exc} ({NVPMODEL_STATUS})")
        gpu_mhz, gpu_pinned = self._gpu(errors)
        cpu_mhz, cpu_pinned = self._cpu(errors)
        clocks: bool | None = None
        if gpu_pinned is not None and cpu_pinned is not None:
            clocks = gpu_pinned and cpu_pinned
        if mode_id is None or clocks is None:
            mode_id, mode_name, clocks = self._from_jtop(mode_id, mode_name, clocks, errors)
        emc_mhz = None
        for rel in EMC_RATE_PATHS:
            with contextlib.suppress(OSError, ValueError):
                emc_mhz = _read_number(self._p(rel)) / 1e6
                break
        temps = self._temperatures()
        return PowerState(
            kind="jetson",
            power_mode=mode_name,
            power_mode_id=mode_id,
            jetson_clocks=clocks,
            gpu_clock_mhz=gpu_mhz,
            cpu_clock_mhz=cpu_mhz,
            emc_clock_mhz=emc_mhz,
            gpu_temp_c=temps.get("gpu"),
            cpu_temp_c=temps.get("cpu"),
            errors=tuple(errors),
        )

    def _gpu(self, errors: list[str]) -> tuple[float | None, bool | None]:
        node = self._gpu_devfreq()
        if node is None:
            errors.append("no Tegra GPU devfreq node")
            return None, None
        try:
            cur = _read_number(os.path.join(node, "cur_freq")) / 1e6
            pinned = _read_number(os.path.join(node, "min_freq")) == _read_number(
                os.path.join(node, "max_freq")
            )
        except (OSError, ValueError) as exc:
            errors.append(f"GPU devfreq unreadable: {exc}")
            return None, None
        return cur, pinned

    def _cpu(self, errors: list[str]) -> tuple[float | None, bool | None]:
        cur: list[float] = []
        pinned: list[bool] = []
        for d in sorted(glob.glob(self._p(CPU_GLOB))):
            with contextlib.suppress(OSError, ValueError):  # an offline core has no readable files
                cur.append(_read_number(os.path.join(d, "scaling_cur_freq")) / 1e3)
                pinned.append(
                    _read_number(os.path.join(d, "scaling_min_freq"))
                    == _read_number(os.path.join(d, "scaling_max_freq"))
                )
        if not cur:
            errors.append("no readable cpufreq")
            return None, None
        return max(cur), (all(pinned) if pinned else None)

    def _temperatures(self) -> dict[str, float]:
        temps: dict[str, float] = {}
        for zone in sorted(glob.glob(self._p(THERMAL_GLOB))):
            with contextlib.suppress(OSError, ValueError):
                kind = _read_text(os.path.join(zone, "type")).lower()
                for key in ("cpu", "gpu"):
                    if kind.startswith(key) and key not in temps:
                        temps[key] = _read_number(os.path.join(zone, "temp")) / 1e3
        return temps

    def _from_jtop(
        self, mode_id: int | None, mode_name: str | None, clocks: bool | None, errors: list[str]
    ) -> tuple[int | None, str | None, bool | None]:
        try:
            client = self._client()
        except Exception as exc:  # jtop raises its own exception types
            errors.append(f"jtop unavailable: {type(exc).__name__}: {exc}")
            return mode_id, mode_name, clocks
        if client is None:
            return mode_id, mode_name, clocks
        try:
            if mode_id is None and getattr(client, "nvpmodel", None) is not None:
                nvp = client.nvpmodel
                mode_id = int(nvp.id)
                mode_name = str(getattr(nvp, "name", None) or nvp)
            if clocks is None and getattr(client, "jetson_clocks", None) is not None:
                clocks = bool(client.jetson_clocks)
        except Exception as exc:
            errors.append(f"jtop read failed: {type(exc).__name__}: {exc}")
        return mode_id, mode_name, clocks

    def close(self) -> None:
        """Disconnect from jtop if it was used."""
        client, self._jtop = self._jtop, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


class NvmlPowerReader:
    """SM clock, power limit, temperature and throttle reasons of NVIDIA GPUs through NVML.

    Args:
        gpu_indices: GPUs to read (the meter's); empty = GPU 0.

    """

    kind: PowerStateKind = "nvml"

    def __init__(self, gpu_indices: Sequence[int] = ()) -> None:
        self.indices = tuple(gpu_indices) or (0,)
        self._nvml: ModuleType | None = None
        self._handles: list[Any] | None = None

    def _open(self) -> tuple[ModuleType, list[Any]]:
        if self._nvml is None or self._handles is None:
            pynvml = importlib.import_module("pynvml")
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]
        return self._nvml, self._handles

    def is_available(self) -> tuple[bool, str]:
        """NVML loads and sees the GPUs."""
        try:
            self._open()
        except Exception as exc:
            self.close()
            return False, f"NVML unavailable: {type(exc).__name__}: {exc}"
        return True, f"nvml GPUs {list(self.indices)}"

    def read(self) -> PowerState:
        """Query each field separately: one unsupported query nulls only its own field."""
        try:
            pynvml, handles = self._open()
        except Exception as exc:
            return PowerState(kind="nvml", errors=(f"NVML unavailable: {type(exc).__name__}: {exc}",))
        errors: list[str] = []

        def query(what: str, fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except Exception as exc:  # NVMLError subclasses, or a driver that went away
                errors.append(f"{what}: {type(exc).__name__}: {exc}")
                return None

        first = handles[0]
        clock = query("SM clock", lambda: pynvml.nvmlDeviceGetClockInfo(first, pynvml.NVML_CLOCK_SM))
        temp = query(
            "temperature", lambda: pynvml.nvmlDeviceGetTemperature(first, pynvml.NVML_TEMPERATURE_GPU)
        )
        limits = [query("power limit", partial(pynvml.nvmlDeviceGetEnforcedPowerLimit, h)) for h in handles]
        limit_w = None if any(v is None for v in limits) else sum(float(v) for v in limits) / 1000.0
        reasons: set[str] | None = set()
        for h in handles:
            mask = query("throttle reasons", partial(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons, h))
            if mask is None:
                reasons = None
                break
            assert reasons is not None
            bits = int(mask)
            reasons |= {short for name, short in THROTTLE_REASONS if bits & int(getattr(pynvml, name, 0))}
        return PowerState(
            kind="nvml",
            power_mode=None if limit_w is None else f"{round(limit_w):d}W-limit",
            gpu_clock_mhz=None if clock is None else float(clock),
            gpu_temp_c=None if temp is None else float(temp),
            power_limit_w=limit_w,
            throttle_reasons=None if reasons is None else tuple(sorted(reasons)),
            errors=tuple(errors),
        )

    def close(self) -> None:
        """Shut NVML down (reference counted by the driver library)."""
        pynvml, self._nvml, self._handles = self._nvml, None, None
        if pynvml is not None:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()


class NullPowerReader:
    """No power state on this host (a CPU, or a GPU without NVML): every field stays null."""

    kind: PowerStateKind = "none"

    def is_available(self) -> tuple[bool, str]:
        """Always usable."""
        return True, "no power-state source"

    def read(self) -> PowerState:
        """The unknown state."""
        return UNKNOWN

    def close(self) -> None:
        """Nothing held."""


def create_power_reader(
    which: str = "auto", *, sysfs_root: str = "/", gpu_indices: Sequence[int] = ()
) -> PowerStateReader:
    """The reader `which` names (`jetson`, `nvml`, `none`), or the first that applies for `auto`.

    `auto` tries jetson first (NVML loads on a Jetson but answers NOT_SUPPORTED), then nvml.
    """
    candidates: list[PowerStateReader]
    if which == "none":
        return NullPowerReader()
    if which == "jetson":
        candidates = [JetsonPowerReader(sysfs_root)]
    elif which == "nvml":
        candidates = [NvmlPowerReader(gpu_indices)]
    elif which == "auto":
        candidates = [JetsonPowerReader(sysfs_root), NvmlPowerReader(gpu_indices)]
    else:
        raise ValueError(f"unknown power-state reader {which!r}; use auto, jetson, nvml or none")
    for reader in candidates:
        ok, why = reader.is_available()
        if ok:
            log.info("power state from %s (%s)", reader.kind, why)
            return reader
        log.info("power state: %s not used: %s", reader.kind, why)
    return NullPowerReader()
