"""Fitting a calibration sweep's samples and reporting the fit: the joule, per-model and universal forms."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from joulecap.runtime.calibrate_sweep import Sample
from joulecap.runtime.predictor import FitResult, Predictor, fit_per_model, fit_universal


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


def encode_rate(samples: Sequence[Sample]) -> float | None:
    """Median measured encode joules per visual token over the sweep's runs with images."""
    rates = [s.encode_j / s.visual_tokens for s in samples if s.visual_tokens > 0 and s.encode_j > 0]
    return float(np.median(rates)) if rates else None
