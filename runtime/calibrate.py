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
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from PIL import Image

from joulecap.runtime.engines.base import Engine, RunHooks
from joulecap.runtime.predictor import FitResult, Predictor, fit_per_model, fit_universal
from joulecap.runtime.profiles import profile_path, save_profile
from joulecap.runtime.types import (
    ChatMessage,
    ImagePart,
    Plan,
    PreparedRequest,
    Request,
    TextPart,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from joulecap.runtime.config import JoulecapConfig
    from joulecap.runtime.energy.monitor import EnergyMonitor

log = logging.getLogger(__name__)

_WORDS = [
    "describe",
    "the",
    "scene",
    "carefully",
    "and",
    "list",
    "every",
    "object",
    "you",
    "can",
    "see",
    "with",
    "its",
    "colour",
    "position",
    "and",
    "size",
    "then",
    "say",
    "what",
    "the",
    "robot",
    "should",
    "do",
    "next",
    "and",
    "why",
]


@dataclass(frozen=True)
class SweepPoint:
    """One configuration of the sweep.

    Attributes:
        image_px: Side of the square test image in pixels (0 = no image).
        visual_frac: Fraction of the image's visual tokens kept, in [0, 1].
        text_words: Words in the prompt.
        out_tokens: Forced output length.
        rep: Repetition index.

    """

    image_px: int
    visual_frac: float
    text_words: int
    out_tokens: int
    rep: int

    @property
    def key(self) -> str:
        """Stable identifier used by the checkpoint."""
        return f"{self.image_px}|{self.visual_frac:.3f}|{self.text_words}|{self.out_tokens}|{self.rep}"


@dataclass(frozen=True)
class Sample:
    """One measured run (a line of the checkpoint)."""

    key: str
    image_px: int
    text_tokens: int
    visual_tokens: int
    visual_kept: int
    out_tokens: int
    energy_j: float
    duration_s: float
    source: str
    meter: str
    encode_j: float = 0.0
    """Energy of `Engine.prepare` (image preprocessing and vision encoder), measured apart: the
    runtime measures it before planning instead of predicting it, so `energy_j` excludes it."""

    @property
    def n_in(self) -> int:
        """Prompt tokens that entered the LM."""
        return self.text_tokens + self.visual_kept

    @property
    def power_w(self) -> float:
        """Mean power of the run."""
        return self.energy_j / self.duration_s if self.duration_s > 0 else math.nan


@dataclass(frozen=True)
class SweepSpec:
    """The grid of a sweep."""

    image_px: tuple[int, ...]
    visual_frac: tuple[float, ...]
    text_words: tuple[int, ...]
    out_tokens: tuple[int, ...]
    reps: int
    warmup: int

    def points(self) -> list[SweepPoint]:
        """All points, repetitions innermost-last so a partial sweep still covers the grid."""
        pts = []
        for rep in range(self.reps):
            for px in self.image_px:
                fracs = self.visual_frac if px else (0.0,)
                for frac in fracs:
                    for words in self.text_words:
                        for out in self.out_tokens:
                            pts.append(SweepPoint(px, frac, words, out, rep))
        return pts


QUICK = SweepSpec((64, 224), (0.0, 0.5, 1.0), (4, 80), (1, 12, 40), reps=1, warmup=2)
"""`--quick`: 36 runs, well under a minute for a tiny model on a CPU."""
FULL = SweepSpec((0, 64, 160, 384), (0.0, 0.25, 0.5, 1.0), (4, 60, 200), (1, 8, 32, 96), reps=3, warmup=3)
"""The default sweep: 3 repetitions of 156 configurations."""


def sweep_image(px: int, seed: int = 0) -> Image.Image:
    """A deterministic structured RGB image (gradient plus blocks) of side `px`."""
    rng = np.random.default_rng(seed + px)
    y, x = np.mgrid[0:px, 0:px]
    img = np.stack([(x * 255 // max(px - 1, 1)), (y * 255 // max(px - 1, 1)), np.full_like(x, 96)], -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, max(px - px // 4, 1), 2)
        img[y0 : y0 + px // 4, x0 : x0 + px // 4] = rng.integers(0, 256, 3)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def make_request(point: SweepPoint, request_id: str = "calibrate") -> Request:
    """The request of a sweep point."""
    text = " ".join(_WORDS[i % len(_WORDS)] for i in range(point.text_words))
    images = (sweep_image(point.image_px),) if point.image_px else ()
    parts: tuple[TextPart | ImagePart, ...] = (*(ImagePart(i) for i in range(len(images))), TextPart(text))
    return Request(
        request_id=request_id,
        messages=(ChatMessage("user", parts),),
        images=images,
        max_tokens=point.out_tokens,
    )


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


# ---------------------------------------------------------------------- fitting and reporting
@dataclass(frozen=True)
class Calibration:
    """The outcome of a sweep."""

    predictor: Predictor
    joules: FitResult
    per_model: FitResult
    universal: FitResult
    samples: tuple[Sample, ...]


def fit_samples(samples: Sequence[Sample], params_b: float, *, forgetting: float = 0.98) -> Calibration:
    """Fit the joule model (used to predict), the per-model power form and the universal form."""
    if len(samples) < 3:
        raise ValueError(f"need at least 3 samples to fit, got {len(samples)}")
    n_in = [s.n_in for s in samples]
    n_out = [s.out_tokens for s in samples]
    energy = [s.energy_j for s in samples]
    joules = fit_per_model(n_in, n_out, energy, 1.0, relative=True)  # P = 1: coefficients are joules
    power = [s.power_w if math.isfinite(s.power_w) else 0.0 for s in samples]
    per_model = fit_per_model(n_in, n_out, energy, power, relative=True)
    universal = fit_universal([params_b] * len(samples), n_in, n_out, energy)
    c = joules.coefficients
    # RLS covariance equivalent to having processed the calibration samples: the predictor's
    # online update regresses relative errors on scaled features, as the relative fit does here.
    x = np.stack([np.ones(len(samples)), np.asarray(n_in) / 256.0, np.asarray(n_out) / 64.0], 1)
    x = x / np.asarray(energy)[:, None]
    cov = np.linalg.pinv(x.T @ x)
    sources = sorted({f"{s.meter} ({s.source})" for s in samples})
    predictor = Predictor(
        c["b_j"],
        c["in_j"],
        c["out_j"],
        calibrated=True,
        source="calibration:" + ",".join(sources),
        forgetting=forgetting,
        covariance=cov.tolist(),
        fit={
            "r2": joules.r2,
            "mape": joules.mape,
            "n": joules.n,
            # JSON has no infinity: an input cost fitted to zero gives no ratio.
            "a_d_over_a_p": joules.a_d_over_a_p if math.isfinite(joules.a_d_over_a_p) else None,
        },
        power_w=per_model.coefficients["power_w"],
    )
    return Calibration(predictor, joules, per_model, universal, tuple(samples))


def format_table(cal: Calibration) -> str:
    """The sweep table (mean per configuration) and the fit quality."""
    groups: dict[tuple[int, int, int, int], list[Sample]] = defaultdict(list)
    for s in cal.samples:
        groups[(s.image_px, s.visual_kept, s.text_tokens, s.out_tokens)].append(s)
    lines = [
        f"{'image':>5} {'vis kept':>8} {'text':>5} {'out':>4} {'runs':>4} {'encode J':>9} {'run J':>10} "
        f"{'pred J':>10} {'err %':>6} {'power W':>8}"
    ]
    for (px, kept, text, out), group in sorted(groups.items()):
        e = float(np.mean([g.energy_j for g in group]))
        p = cal.predictor.predict(text, kept, out).total_j
        w = float(np.mean([g.power_w for g in group]))
        enc = float(np.mean([g.encode_j for g in group]))
        lines.append(
            f"{px:>5} {kept:>8} {text:>5} {out:>4} {len(group):>4} {enc:>9.4f} {e:>10.4f} {p:>10.4f} "
            f"{100 * (p - e) / e:>6.1f} {w:>8.1f}"
        )
    j, pm, u = cal.joules, cal.per_model, cal.universal
    c = pm.coefficients
    lines += [
        "",
        "encode J: image preprocessing and vision encoder, measured before planning (not predicted); "
        "run J: the LM prefill and decode, which the models below predict.",
        f"joule model  E = {j.coefficients['b_j']:.4g} + {j.coefficients['in_j']:.4g}*N_in + "
        f"{j.coefficients['out_j']:.4g}*N_out J   R2 {j.r2:.4f}  MAPE {100 * j.mape:.2f}%  n {j.n}",
        f"per-model    E = P*({c['a_p_s']:.4g}*N_in + {c['a_d_s']:.4g}*N_out + {c['b_s']:.4g}) "
        f"(mean P {c['power_w']:.1f} W)   R2 {pm.r2:.4f}  MAPE {100 * pm.mape:.2f}%  "
        f"a_d/a_p {pm.a_d_over_a_p:.1f}",
        f"universal    (one model size: S terms are collinear)   R2 {u.r2:.4f}  MAPE {100 * u.mape:.2f}%",
    ]
    return "\n".join(lines)


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


def encode_rate(samples: Sequence[Sample]) -> float | None:
    """Median measured encode joules per visual token over the sweep's runs with images."""
    rates = [s.encode_j / s.visual_tokens for s in samples if s.visual_tokens > 0 and s.encode_j > 0]
    return float(np.median(rates)) if rates else None


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
