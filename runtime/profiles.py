"""Energy profiles on disk: where they live, the shipped default, loading and atomic saving.

A profile is one JSON file per (model, device, dtype) holding a calibrated `Predictor`'s
coefficients, fit quality and RLS covariance. A corrupt or foreign file is refused with its path
and reason and the shipped universal default is used instead, so a bad file never stops a server.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from joulecap.runtime.predictor import Predictor, universal_power_w

log = logging.getLogger(__name__)

PROFILE_FORMAT = "joulecap-profile"
PROFILE_VERSION = 1


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("._") or "x"


def profile_path(profile_dir: str | Path, model: str, device: str, dtype: str, power_mode: str = "") -> Path:
    """Where the profile of (model, device, dtype[, power mode]) lives."""
    mode = f"__{_slug(power_mode)}" if power_mode else ""
    return Path(profile_dir) / f"{_slug(model)}__{_slug(device)}__{_slug(dtype)}{mode}.json"


def load_default(params_b: float, *, forgetting: float = 0.98, speed_alpha: float = 0.0) -> Predictor:
    """The shipped universal default at size `params_b` (calibrated False).

    `E = P(S)*(a_p(S)*N_in + a_d(S)*N_out + b(S))` with `P(S) = 12.1*S + 42.2` W and times
    linear in S (see `runtime/data/default_profile.json`).
    """
    raw = resources.files("joulecap.runtime").joinpath("data/default_profile.json").read_text()
    data = json.loads(raw)
    s = max(0.0, float(params_b))
    power = universal_power_w(s, data["power_w"]["base_w"], data["power_w"]["per_b_w"])
    sec = {name: t["base"] + t["per_b"] * s for name, t in data["seconds"].items()}
    return Predictor(
        power * sec["b_s"],
        power * sec["a_p_s"],
        power * sec["a_d_s"],
        calibrated=False,
        source="default",
        forgetting=forgetting,
        power_w=power,
        speed_alpha=speed_alpha,
    )


class ProfileError(ValueError):
    """A profile file that cannot be used (corrupt, foreign, wrong model)."""


def _read_profile(path: Path, model: str, device: str, dtype: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"unreadable JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"not a {PROFILE_FORMAT} file")
    if data.get("version") != PROFILE_VERSION:
        raise ProfileError(f"unsupported version {data.get('version')!r}")
    for key, want in (("model", model), ("device", device), ("dtype", dtype)):
        if data.get(key) != want:
            raise ProfileError(f"{key} is {data.get(key)!r}, expected {want!r}")
    coef = data.get("coefficients")
    if not isinstance(coef, dict):
        raise ProfileError("missing coefficients")
    for key in ("b_j", "in_j", "out_j"):
        value = coef.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ProfileError(f"coefficient {key} is {value!r}, not a finite number")
    if not coef["out_j"] > 0:
        raise ProfileError(f"out_j must be > 0, got {coef['out_j']}")
    return data


def load_profile(
    profile_dir: str | Path,
    model: str,
    device: str,
    dtype: str,
    params_b: float,
    *,
    forgetting: float = 0.98,
    speed_alpha: float = 0.0,
) -> Predictor:
    """The predictor for (model, device, dtype): its calibrated profile, else the shipped default.

    A corrupt or foreign profile is refused with a warning naming the file and the reason; the
    default is used and the caller keeps running.
    """
    data, why = read_profile(profile_dir, model, device, dtype)
    if data is None:
        log.info("%s; using the uncalibrated universal default", why)
        return load_default(params_b, forgetting=forgetting, speed_alpha=speed_alpha)
    return predictor_from(data, forgetting=forgetting, speed_alpha=speed_alpha)


def read_profile(
    profile_dir: str | Path, model: str, device: str, dtype: str, power_mode: str = ""
) -> tuple[dict[str, Any] | None, str]:
    """The profile's data, or None with why there is none usable (absent, corrupt, foreign)."""
    path = profile_path(profile_dir, model, device, dtype, power_mode)
    if not path.exists():
        return None, f"no energy profile at {path}"
    try:
        return _read_profile(path, model, device, dtype), f"energy profile {path}"
    except ProfileError as exc:
        log.warning("ignoring energy profile %s: %s", path, exc)
        return None, f"energy profile {path} ignored ({exc})"


def predictor_from(data: dict[str, Any], *, forgetting: float = 0.98, speed_alpha: float = 0.0) -> Predictor:
    """A calibrated predictor from a profile's validated data."""
    coef = data["coefficients"]
    cov = data.get("rls_covariance")
    if not (isinstance(cov, list) and np.asarray(cov, dtype=object).size == 9):
        cov = None
    return Predictor(
        float(coef["b_j"]),
        float(coef["in_j"]),
        float(coef["out_j"]),
        calibrated=True,
        source=str(data.get("source", "calibration")),
        forgetting=forgetting,
        covariance=cov,
        fit=data.get("fit") if isinstance(data.get("fit"), dict) else None,
        power_w=data.get("power_w"),
        speed_alpha=speed_alpha,
    )


def save_profile(
    profile_dir: str | Path,
    model: str,
    device: str,
    dtype: str,
    predictor: Predictor,
    *,
    params_b: float,
    extra: dict[str, Any] | None = None,
    power_mode: str = "",
) -> Path:
    """Write the profile atomically (temp file in the same directory, then `os.replace`)."""
    path = profile_path(profile_dir, model, device, dtype, power_mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    b_j, in_j, out_j = predictor.coefficients
    data: dict[str, Any] = {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "model": model,
        "device": device,
        "dtype": dtype,
        "power_mode": power_mode or None,
        "params_b": params_b,
        "created_s": time.time(),
        "source": predictor.source,
        "power_w": predictor.power_w,
        "coefficients": {"b_j": b_j, "in_j": in_j, "out_j": out_j},
        "fit": predictor.fit,
        "rls_covariance": predictor.covariance(),
        **(extra or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
