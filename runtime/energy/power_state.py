"""The device's power state at request time: Jetson nvpmodel and clocks, or an NVIDIA GPU's limits.

Energy figures are only comparable within one power state: on a Jetson the nvpmodel mode and
`jetson_clocks` move throughput 2-3x, and on a discrete GPU so do clocks, the power limit and
throttling. Each ledger row therefore carries the state it ran in, and the predictor's
profiles are kept per power mode (`profile_key_suffix`).

Readers (nothing is probed at import; each has `is_available()`):

- **jetson** (sysfs, relative to `EnergyConfig.sysfs_root`):

  - nvpmodel mode: `var/lib/nvpmodel/status` (`pmode:0002 fmode:quiet`) gives the id, and
    `etc/nvpmodel.conf` (`< POWER_MODEL ID=2 NAME=15W >`) its name. When the status file is
    missing but the jtop socket is there, the mode comes from jetson-stats (`jetson.nvpmodel`).
  - `jetson_clocks`: on when the GPU's devfreq `min_freq` equals its `max_freq` and every
    online CPU's `scaling_min_freq` equals its `scaling_max_freq` (what `jetson_clocks` writes;
    the DVFS governors otherwise leave min below max). jtop's `jetson_clocks` status is used
    when sysfs cannot tell.
  - GPU clock: `sys/class/devfreq/*.ga10b|*.gv11b|*.gp10b/cur_freq` (Hz); CPU clock: the
    highest `sys/devices/system/cpu/cpu*/cpufreq/scaling_cur_freq` (kHz); EMC clock:
    `sys/kernel/debug/bpmp/debug/clk/emc/rate` (Hz, debugfs: root only, else null).
  - temperatures: `sys/class/thermal/thermal_zone*/{type,temp}` (m°C), zones `cpu-thermal`
    and `gpu-thermal` (names of Orin's L4T 35/36 device trees).

- **nvml** (`pynvml`, imported lazily): SM clock, enforced power limit, GPU temperature and the
  active clock-throttle reasons of the GPUs the meter sums (the first one's clock and
  temperature, the sum of the limits, the union of throttle reasons). A query that raises
  leaves its field null and says why in `errors`, never the whole state.

Not tested on a real Jetson or GPU here (none on this machine): the tests build sysfs trees of
Orin Nano/NX and AGX Orin layouts in a temp folder and fake the `pynvml` module.

`PowerStateCache` re-reads at most every `ttl_s` (reads take well under a millisecond on sysfs
and a few NVML calls), so a request asks for the state for free, and counts mode changes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

from joulecap.runtime.energy.config import EnergyConfig

log = logging.getLogger(__name__)

PowerStateKind = Literal["jetson", "nvml", "none"]

NVPMODEL_STATUS = "var/lib/nvpmodel/status"
NVPMODEL_CONF = "etc/nvpmodel.conf"
JTOP_SOCKET = "run/jtop.sock"
GPU_DEVFREQ_GLOBS = (
    "sys/class/devfreq/*.ga10b",  # Orin (Nano, NX, AGX)
    "sys/class/devfreq/*.gv11b",  # Xavier
    "sys/class/devfreq/*.gp10b",  # TX2
    "sys/class/devfreq/*.gpu",
)
CPU_GLOB = "sys/devices/system/cpu/cpu[0-9]*/cpufreq"
EMC_RATE_PATHS = ("sys/kernel/debug/bpmp/debug/clk/emc/rate", "sys/kernel/debug/clk/emc/clk_rate")
THERMAL_GLOB = "sys/class/thermal/thermal_zone*"

PMODE_RE = re.compile(r"pmode:\s*(\d+)")
POWER_MODEL_RE = re.compile(r"<\s*POWER_MODEL\s+ID\s*=\s*(\d+)\s+NAME\s*=\s*([^\s>]+)\s*>")

THROTTLE_REASONS: tuple[tuple[str, str], ...] = (
    ("nvmlClocksThrottleReasonGpuIdle", "gpu_idle"),
    ("nvmlClocksThrottleReasonApplicationsClocksSetting", "applications_clocks"),
    ("nvmlClocksThrottleReasonSwPowerCap", "sw_power_cap"),
    ("nvmlClocksThrottleReasonHwSlowdown", "hw_slowdown"),
    ("nvmlClocksThrottleReasonSyncBoost", "sync_boost"),
    ("nvmlClocksThrottleReasonSwThermalSlowdown", "sw_thermal"),
    ("nvmlClocksThrottleReasonHwThermalSlowdown", "hw_thermal"),
    ("nvmlClocksThrottleReasonHwPowerBrakeSlowdown", "hw_power_brake"),
    ("nvmlClocksThrottleReasonDisplayClockSetting", "display_clocks"),
)
"""NVML throttle-reason bit constants (by name, as `pynvml` exports them) and our short names."""


@dataclass(frozen=True)
class PowerState:
    """What the device ran in. Every field is None where the hardware or permissions do not say.

    Attributes:
        kind: Which reader produced it (`none`: no reader applies here).
        power_mode: Jetson: the nvpmodel mode's name (`MAXN`, `15W`, ...). NVML: the enforced
            power limit, written `<W>W-limit` (the knob that plays nvpmodel's role on a GPU).
        power_mode_id: Jetson: the nvpmodel mode id. NVML: None.
        jetson_clocks: Jetson: whether `jetson_clocks` pinned the clocks.
        gpu_clock_mhz: GPU clock now (Jetson devfreq; NVML SM clock).
        cpu_clock_mhz: Highest CPU core clock now (Jetson).
        emc_clock_mhz: Memory controller clock (Jetson, needs debugfs).
        gpu_temp_c: GPU temperature.
        cpu_temp_c: CPU temperature (Jetson).
        power_limit_w: Enforced power limit (NVML; summed over the GPUs read).
        throttle_reasons: Active clock-throttle reasons (NVML), e.g. `("sw_power_cap",)`.
        errors: What could not be read and why (for the log and `/v1/energy/profile`).

    """

    kind: PowerStateKind = "none"
    power_mode: str | None = None
    power_mode_id: int | None = None
    jetson_clocks: bool | None = None
    gpu_clock_mhz: float | None = None
    cpu_clock_mhz: float | None = None
    emc_clock_mhz: float | None = None
    gpu_temp_c: float | None = None
    cpu_temp_c: float | None = None
    power_limit_w: float | None = None
    throttle_reasons: tuple[str, ...] | None = None
    errors: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        out = asdict(self)
        out["throttle_reasons"] = list(self.throttle_reasons) if self.throttle_reasons is not None else None
        out["errors"] = list(self.errors)
        return out

    def ledger_fields(self) -> dict[str, Any]:
        """The ledger's power-state columns for this state (`runtime/ledger.py`)."""
        return {
            "power_mode": self.power_mode,
            "power_mode_id": self.power_mode_id,
            "jetson_clocks": None if self.jetson_clocks is None else int(self.jetson_clocks),
            "gpu_clock_mhz": self.gpu_clock_mhz,
            "cpu_clock_mhz": self.cpu_clock_mhz,
            "emc_clock_mhz": self.emc_clock_mhz,
            "gpu_temp_c": self.gpu_temp_c,
            "cpu_temp_c": self.cpu_temp_c,
            "power_limit_w": self.power_limit_w,
            "throttle_reasons": None if self.throttle_reasons is None else ",".join(self.throttle_reasons),
        }

    @property
    def mode_key(self) -> tuple[Any, ...]:
        """What identifies the power mode (clock and temperature readings excluded)."""
        return (self.kind, self.power_mode, self.power_mode_id, self.jetson_clocks)


UNKNOWN = PowerState()
"""The state when no reader applies (a CPU host, a GPU without NVML)."""


def profile_key_suffix(state: PowerState) -> str:
    """The suffix that makes a predictor profile key per power mode, or "" when the mode is unknown.

    Jetson: `nvp<ID>-<NAME>` plus `-clocks` when `jetson_clocks` is on (`nvp2-15W-clocks`).
    NVML: `pl<W>` from the enforced power limit (`pl300`). Unknown: "" (the profile key is the
    one used before power modes existed, so existing profiles keep working on CPUs).
    """
    if state.kind == "jetson" and (state.power_mode_id is not None or state.power_mode):
        ident = "" if state.power_mode_id is None else str(state.power_mode_id)
        name = _safe(state.power_mode) if state.power_mode else ""
        suffix = "nvp" + "-".join(p for p in (ident, name) if p)
        return suffix + ("-clocks" if state.jetson_clocks else "")
    if state.kind == "nvml" and state.power_limit_w is not None:
        return f"pl{round(state.power_limit_w):d}"
    return ""


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)


class PowerStateReader(Protocol):
    """A source of `PowerState`s."""

    kind: PowerStateKind

    def is_available(self) -> tuple[bool, str]:
        """Whether this reader applies here, and why not."""
        ...

    def read(self) -> PowerState:
        """Read the state now (never raises: unreadable fields are None, with `errors`)."""
        ...

    def close(self) -> None:
        """Release handles."""
        ...


class PowerStateCache:
    """The current `PowerState`, re-read at most every `ttl_s`, with mode changes counted.

    Without `start()`, a `current()` call that finds the state older than `ttl_s` reads it in
    the caller's thread. After `start()` a daemon thread re-reads it every `ttl_s` and
    `current()` only returns the newest state: an uncached read costs milliseconds (a dozen
    sysfs files; `benchmarks/operations.py`), which a request should not pay.

    Args:
        reader: Where states come from.
        ttl_s: Longest a state is reused (0 reads on every call; no thread then).
        clock: Monotonic clock (tests pass a fake one).

    """

    def __init__(
        self, reader: PowerStateReader, ttl_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.reader = reader
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._state: PowerState | None = None
        self._read_at = -float("inf")
        self.mode_changes = 0
        """How many times the power mode (not clocks or temperatures) changed since start."""
        self._logged_errors: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> PowerState:
        try:
            state = self.reader.read()
        except Exception as exc:  # a reader bug costs the power state, never a request
            state = replace(UNKNOWN, kind=self.reader.kind, errors=(f"{type(exc).__name__}: {exc}",))
        with self._lock:
            previous, self._state, self._read_at = self._state, state, self._clock()
        if previous is not None and previous.mode_key != state.mode_key:
            self.mode_changes += 1
            old, new = profile_key_suffix(previous) or "?", profile_key_suffix(state) or "?"
            log.warning("power mode changed: %s -> %s", old, new)
        for err in state.errors:
            if err not in self._logged_errors and len(self._logged_errors) < 32:
                self._logged_errors.add(err)
                log.info("power state: %s", err)
        return state

    def current(self) -> PowerState:
        """The state now (at most `ttl_s` old, or the newest the refresh thread read); never raises."""
        with self._lock:
            state, fresh = self._state, self._clock() - self._read_at < self.ttl_s
        if state is not None and (fresh or self._thread is not None):
            return state
        return self._read()

    def start(self) -> None:
        """Read now, then keep the state fresh from a daemon thread (idempotent)."""
        if self._thread is not None or self.ttl_s <= 0:
            return
        self._read()
        self._thread = threading.Thread(target=self._run, name="joulecap-power-state", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s):
            self._read()

    def close(self) -> None:
        """Stop the refresh thread and close the reader."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)
        self.reader.close()


@dataclass(frozen=True)
class ProfileChoice:
    """Which predictor profile a power state maps to.

    Attributes:
        key: The profile key to use.
        exact: True when a profile calibrated for this power mode exists.
        flag: Why the profile does not match the mode (empty when it does), for the log,
            `/v1/energy/profile` and the response's energy note.

    """

    key: str
    exact: bool
    flag: str = ""


def choose_profile(
    base_key: str, state: PowerState, calibrated: Sequence[str], *, sep: str = "@"
) -> ProfileChoice:
    """Pick the profile for `state` among the calibrated profile keys.

    `base_key` is the profile key without power mode (model, device, dtype). The key for the
    mode is `base_key + sep + profile_key_suffix(state)` (a file stem can use `sep="__"`).
    When it is calibrated it is used; otherwise the mode-less `base_key` (a profile calibrated
    before power modes were recorded, or on a host where the mode is unknown) is used and the
    mismatch is flagged until
    `joulecap calibrate` writes one for this mode.
    """
    suffix = profile_key_suffix(state)
    if not suffix:
        return ProfileChoice(base_key, base_key in calibrated)
    key = f"{base_key}{sep}{suffix}"
    if key in calibrated:
        return ProfileChoice(key, True)
    return ProfileChoice(
        base_key,
        False,
        f"no profile calibrated for power mode {suffix}; predictions use {base_key} until "
        "`joulecap calibrate` runs in this mode",
    )


def create_power_state_cache(config: EnergyConfig) -> PowerStateCache:
    """The runtime's power-state cache, per `EnergyConfig.power_state` and `power_state_ttl_s`."""
    from joulecap.runtime.energy.power_readers import create_power_reader

    reader = create_power_reader(
        config.power_state, sysfs_root=config.sysfs_root, gpu_indices=config.gpu_indices
    )
    return PowerStateCache(reader, ttl_s=config.power_state_ttl_s)
