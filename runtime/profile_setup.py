"""Which energy profile a server plans with, and how it got it: loaded, calibrated now, or the default.

With no usable profile for (model, device, dtype) the server calibrates itself at start-up (the
quick sweep, progress in the log) and saves the profile, so the next start loads it. The choice
against an online-only fit from the shipped default: the default is off by an order of magnitude
on hardware it was not fitted on (17x on the 2-core CPU), and RLS from that far needs tens of
requests, each planned on a wrong prediction; the quick sweep costs seconds to minutes once per
(model, device, dtype) and plans right from the first request. `--no-auto-calibrate` serves on the
default and says so in `/v1/energy/profile` and in every response's `note`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from joulecap.runtime.calibrate import calibrate_and_save
from joulecap.runtime.calibrate_config import CalibrationConfig
from joulecap.runtime.calibrate_sweep import QUICK
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.engines.base import Engine
from joulecap.runtime.learning import LearningConfig
from joulecap.runtime.paths import Paths
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.profiles import load_default, predictor_from, read_profile

log = logging.getLogger(__name__)

UNCALIBRATED_NOTE = (
    "energy predictions use the uncalibrated default profile (no profile for this model and device; "
    "run `joulecap calibrate --quick` or serve without --no-auto-calibrate)"
)


@dataclass(frozen=True)
class ProfileSetup:
    """The predictor a server starts with.

    Attributes:
        predictor: The energy model.
        how: How it was made (`loaded`, `calibrated at start-up`, `default`), for logs and
            `/v1/energy/profile`.
        detail: The file, or why there is none.
        note: What every response's `note` says about it ("" when calibrated).

    """

    predictor: Predictor
    how: str
    detail: str
    note: str


def setup_profile(
    engine: Engine,
    monitor: EnergyMonitor,
    paths: Paths,
    learning: LearningConfig,
    calibration: CalibrationConfig,
    power_mode: str = "",
) -> ProfileSetup:
    """Load the profile for the engine's model in this power mode, calibrating first when there is none.

    Profiles are kept per (model, device, dtype, power mode); `power_mode` is "" where the mode is
    unknown (a CPU). A mode without its own profile uses the mode-less one, flagged in every
    response's note until `joulecap calibrate` runs in that mode.
    """
    info = engine.info
    opts = {"forgetting": learning.rls_forgetting, "speed_alpha": learning.speed_alpha}
    data, why = read_profile(paths.profile_dir, info.model, info.device, info.dtype, power_mode)
    if data is not None:
        log.info("%s: loaded (source %s)", why, data.get("source"))
        return ProfileSetup(predictor_from(data, **opts), "loaded", why, "")
    if power_mode:
        data, base = read_profile(paths.profile_dir, info.model, info.device, info.dtype)
        if data is not None:
            flag = (
                f"no energy profile for power mode {power_mode}; predictions use {base} "
                "until `joulecap calibrate` runs in this mode"
            )
            log.warning("%s", flag)
            predictor = predictor_from(data, **opts)
            return ProfileSetup(predictor, "loaded (other power mode)", base, flag)
    if not calibration.auto_calibrate:
        log.warning("%s; --no-auto-calibrate: serving on the uncalibrated default", why)
        predictor = load_default(info.params_b, **opts)
        return ProfileSetup(predictor, "default", why, UNCALIBRATED_NOTE)
    n = len(QUICK.points())
    log.info("%s: calibrating now (quick sweep, %d runs; --no-auto-calibrate to skip)", why, n)
    started_s = time.monotonic()
    done = 0

    def progress(k: int) -> None:
        nonlocal done
        done += k
        if done % 6 == 0 or done == n:
            log.info("calibration: %d/%d runs", done, n)

    _, path = calibrate_and_save(
        engine,
        monitor,
        paths.profile_dir,
        quick=True,
        forgetting=learning.rls_forgetting,
        progress=progress,
        power_mode=power_mode,
    )
    data, why = read_profile(paths.profile_dir, info.model, info.device, info.dtype, power_mode)
    if data is None:  # pragma: no cover - the profile was just written
        raise RuntimeError(f"calibration wrote {path}, but it cannot be read back: {why}")
    log.info("calibrated at start-up in %.1f s: %s", time.monotonic() - started_s, path)
    return ProfileSetup(predictor_from(data, **opts), "calibrated at start-up", str(path), "")
