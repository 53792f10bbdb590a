"""`joulecap calibrate`: measure a model's energy over a sweep, fit it, write the profile.

The sweep crosses image sizes, the fraction of visual tokens kept (none to all), prompt length and
a forced output length, with warm-up runs and repetitions. Each run is measured exactly as the
runtime measures requests (`EnergyMonitor.report` over the engine's phase marks, the live meter
polled between tokens), so the fitted profile predicts what the runtime will later compare with
budgets. Every finished point is appended to a JSONL checkpoint; an interrupted sweep resumes from
it. With only the estimate meter the sweep still runs, and says loudly that the profile then
describes the estimate's power model, not measured hardware.

Forcing the output length: the engine stops at the model's stop tokens. When the engine exposes
`stop_ids` (the transformers engine does) they are suppressed during the sweep; otherwise runs may
end early, which costs coverage but not correctness, because the fit uses the tokens actually
generated.

The grid, each point's request and the samples are `calibrate_sweep.py`'s; the fit and its table
are `calibrate_fit.py`'s. This module measures, checkpoints and writes the profile.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from joulecap.runtime.calibrate_fit import Calibration, encode_rate, fit_samples, format_table
from joulecap.runtime.calibrate_sweep import FULL, QUICK, Sample, SweepPoint, SweepSpec, make_request
from joulecap.runtime.engines.base import Engine, RunHooks
from joulecap.runtime.profiles import profile_path, save_profile
from joulecap.runtime.types import Plan, PreparedRequest

if TYPE_CHECKING:  # pragma: no cover - typing only
    from joulecap.runtime.config import JoulecapConfig
    from joulecap.runtime.energy.monitor import EnergyMonitor

log = logging.getLogger(__name__)


@contextmanager
def forced_length(engine: Engine) -> Iterator[bool]:
    """Suppress the engine's stop tokens while the block runs; yields whether that was possible."""
    stop_ids = getattr(engine, "stop_ids", None)
    if stop_ids is None:
        yield False
        return
    setattr(engine, "stop_ids", type(stop_ids)())  # noqa: B010 - not part of the Engine protocol
    try:
        yield True
    finally:
        setattr(engine, "stop_ids", stop_ids)  # noqa: B010


def run_measured(
    engine: Engine, monitor: EnergyMonitor, prepared: PreparedRequest, plan: Plan
) -> tuple[int, int, float, float, str, str]:
    """Run `plan` and measure it as the runtime does.

    Returns:
        (visual_kept, out_tokens, energy_j, duration_s, source, meter).

    """
    start_s = time.monotonic()

    def poll(_n: int) -> bool:
        # Same live polling as the governor (marks the window busy for the idle baseline).
        monitor.live_energy_j(start_s)
        return False

    gen = engine.run(prepared, plan, RunHooks(should_stop=poll, cancelled=threading.Event()))
    report = monitor.report(gen.times, predicted_prefill_j=0.0, predicted_decode_j=0.0)
    return (
        gen.visual_tokens_kept,
        len(gen.token_ids),
        report.total_j,
        report.duration_s,
        report.source,
        report.meter,
    )


def measure_point(engine: Engine, monitor: EnergyMonitor, point: SweepPoint) -> Sample:
    """Prepare, plan (fixed keep fraction and output length) and measure one sweep point."""
    # Image preprocessing and the vision encoder are measured apart, as the runtime does before
    # planning; the fit models only the run (what the planner must predict).
    prepared, encode = monitor.measure(lambda: engine.prepare(make_request(point)))
    keep = tuple(round(point.visual_frac * n) for n in prepared.visual_tokens)
    room = prepared.context_length - prepared.text_tokens - sum(keep)
    out = max(1, min(point.out_tokens, room))
    plan = Plan(keep, out, 0.0, "calibrate", "calibration sweep", budget_j=None)
    kept, n_out, energy_j, duration_s, source, meter = run_measured(engine, monitor, prepared, plan)
    return Sample(
        point.key,
        point.image_px,
        prepared.text_tokens,
        sum(prepared.visual_tokens),
        kept,
        n_out,
        energy_j,
        duration_s,
        source,
        meter,
        encode.total_j,
    )


# ---------------------------------------------------------------------- checkpoint
def sweep_header(header: dict[str, Any], spec: SweepSpec) -> dict[str, Any]:
    """The checkpoint's first line, as JSON reads it back (tuples become lists)."""
    # `energy`: what `Sample.energy_j` covers; a checkpoint that measured otherwise is not resumed.
    loaded: dict[str, Any] = json.loads(json.dumps({**header, "spec": asdict(spec), "energy": "run"}))
    return loaded


def read_checkpoint(path: Path, header: dict[str, Any]) -> dict[str, Sample]:
    """Samples of an interrupted sweep with the same header (model, device, dtype, meter, grid)."""
    if not path.exists():
        return {}
    done: dict[str, Sample] = {}
    with path.open() as fh:
        lines = fh.read().splitlines()
    if not lines:
        return {}
    try:
        if json.loads(lines[0]) != header:
            log.warning("checkpoint %s is from another sweep; starting over", path)
            return {}
    except json.JSONDecodeError:
        return {}
    for line in lines[1:]:
        try:
            sample = Sample(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue  # a line cut by the interruption
        done[sample.key] = sample
    return done


class Checkpoint:
    """Append-only JSONL: a header line, then one sample per line (flushed each time)."""

    def __init__(self, path: Path, header: dict[str, Any], keep: dict[str, Sample]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh: TextIO = path.open("w")
        self._fh.write(json.dumps(header) + "\n")
        for sample in keep.values():
            self.append(sample)

    def append(self, sample: Sample) -> None:
        """Record one finished point."""
        self._fh.write(json.dumps(asdict(sample)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


def calibrate(
    engine: Engine,
    monitor: EnergyMonitor,
    spec: SweepSpec,
    checkpoint: Path,
    *,
    resume: bool = True,
    header: dict[str, Any] | None = None,
    progress: Callable[[int], Any] | None = None,
    forgetting: float = 0.98,
) -> Calibration:
    """Run (or resume) the sweep and fit it."""
    header = sweep_header(header or {}, spec)
    done = read_checkpoint(checkpoint, header) if resume else {}
    points = spec.points()
    todo = [p for p in points if p.key not in done]
    ckpt = Checkpoint(checkpoint, header, {k: v for k, v in done.items()})
    try:
        with forced_length(engine) as forced:
            if not forced:
                log.warning("engine %s cannot ignore stop tokens; output lengths may fall short", engine)
            if todo:
                for i in range(spec.warmup):  # warm caches, allocator, thread pools; not recorded
                    measure_point(engine, monitor, todo[i % len(todo)])
            for point in todo:
                sample = measure_point(engine, monitor, point)
                done[point.key] = sample
                ckpt.append(sample)
                if progress is not None:
                    progress(1)
    finally:
        ckpt.close()
    samples = [done[p.key] for p in points if p.key in done]
    return fit_samples(samples, engine.info.params_b, forgetting=forgetting)


def calibrate_and_save(
    engine: Engine,
    monitor: EnergyMonitor,
    profile_dir: Path,
    *,
    quick: bool,
    resume: bool = True,
    forgetting: float = 0.98,
    progress: Callable[[int], Any] | None = None,
    power_mode: str = "",
) -> tuple[Calibration, Path]:
    """Run (or resume) the sweep on a started monitor, fit it and write the profile.

    Returns:
        The calibration and the profile's path.

    """
    info = engine.info
    target = profile_path(profile_dir, info.model, info.device, info.dtype, power_mode)
    checkpoint = target.with_suffix(".sweep.jsonl")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    spec = QUICK if quick else FULL
    header = {"model": info.model, "device": info.device, "dtype": info.dtype, "meter": monitor.meter.name}
    cal = calibrate(
        engine,
        monitor,
        spec,
        checkpoint,
        resume=resume,
        header=header,
        progress=progress,
        forgetting=forgetting,
    )
    ratio = cal.per_model.a_d_over_a_p
    path = save_profile(
        profile_dir,
        info.model,
        info.device,
        info.dtype,
        cal.predictor,
        params_b=info.params_b,
        power_mode=power_mode,
        extra={
            "energy_source": sorted({s.source for s in cal.samples}),
            "meter": monitor.meter.name,
            "sweep": "quick" if quick else "full",
            "encode": {"j_per_visual_token": encode_rate(cal.samples)},
            "per_model": {
                **cal.per_model.coefficients,
                "r2": cal.per_model.r2,
                "mape": cal.per_model.mape,
                "a_d_over_a_p": ratio if math.isfinite(ratio) else None,
            },
            "universal": {**cal.universal.coefficients, "r2": cal.universal.r2, "mape": cal.universal.mape},
        },
    )
    checkpoint.unlink(missing_ok=True)
    return cal, path


def calibrate_command(config: JoulecapConfig) -> int:
    """CLI entry: sweep, print the table and fit quality, write the profile. Returns the exit code."""
    from tqdm import tqdm

    from joulecap.runtime.energy.factory import create_meter
    from joulecap.runtime.energy.monitor import EnergyMonitor
    from joulecap.runtime.energy.power_state import create_power_state_cache, profile_key_suffix
    from joulecap.runtime.engines.factory import create_engine
    from joulecap.runtime.paths import Paths

    paths = Paths.resolve(config.paths)
    quick = config.calibration.quick
    power = create_power_state_cache(config.energy)
    power_mode = profile_key_suffix(power.current())
    power.close()
    engine = create_engine(config.engine, paths.cache_dir)
    meter = create_meter(config.energy)
    monitor = EnergyMonitor(meter, config.energy)
    info = engine.info
    if meter.source != "measured":
        banner = "!" * 78
        print(
            f"{banner}\n! ONLY AN ESTIMATE METER ({meter.name}): no energy counter on this machine.\n"
            "! The sweep runs, but the profile fits the estimate's power model (watts x time),\n"
            "! NOT measured hardware energy. It is labelled as such in the profile.\n"
            f"{banner}",
            file=sys.stderr,
        )
    print(f"calibrating {info.model} on {info.device}/{info.dtype} with {meter.name} ({meter.source})")
    try:
        monitor.start()
        total = len((QUICK if quick else FULL).points())
        with tqdm(total=total, unit="run", desc="calibrate") as bar:
            cal, path = calibrate_and_save(
                engine,
                monitor,
                paths.profile_dir,
                quick=quick,
                resume=config.calibration.resume,
                forgetting=config.learning.rls_forgetting,
                progress=bar.update,
                power_mode=power_mode,
            )
    except KeyboardInterrupt:
        print("\ninterrupted; progress kept beside the profile (run again to resume)", file=sys.stderr)
        return 130
    finally:
        monitor.stop()
        meter.close()
        engine.close()
    print(format_table(cal))
    print(f"wrote profile {path}")
    return 0
