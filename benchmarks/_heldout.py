"""Held-out accuracy of a calibrated predictor, and how much of its error this machine allows.

A predictor cannot be more accurate than the energy it is scored against is repeatable. Besides
the MAPE, `held_out_mape` therefore measures two floors on the same requests:

* `repeat_ape_pct`: each held-out request runs twice back to back; the mean of
  `|m1 - m2| / (m1 + m2)` is the error of a predictor that knew each request's true mean cost
  exactly (estimated from the pair), i.e. the run-to-run noise of meter plus machine over seconds.
* `refit_loo_mape_pct`: the predictor's own linear form, least-squares fitted to the held-out rows
  themselves and scored leave-one-out: what remains when calibration-to-held-out drift is taken
  away and only the form and the noise are left.

* `reference_ape_pct`: one fixed request runs before every held-out request; the mean of
  `|r_i - mean(r)| / r_i` is the error of a predictor that knew that request's mean cost over the
  whole pass exactly but not how fast the machine is running at each moment. Unlike the
  back-to-back repeat, this includes drift over seconds.

No predictor of this form can score much below these floors on this machine; the benchmark
reports them beside the MAPE so a reader can tell the predictor's error from the machine's noise.

Besides the frozen calibrated predictor, `online` predictors (copies that learn from each
held-out measurement after predicting it, as a server's predictor does) are scored on the same
requests, so the online update's effect is measured side by side.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from benchmarks._common import pct


def refit_loo_mape_pct(rows: list[dict[str, Any]]) -> float:
    """Leave-one-out MAPE of the calibration's own fit, made on `rows` themselves.

    The fit is `fit_per_model` as calibration calls it (joules, relative weights, coefficients
    >= 0): `E = b_j + in_j * N_in + out_j * N_out`.
    """
    from joulecap.runtime.predictor import fit_per_model

    if len(rows) < 5:
        return float("nan")
    n_in = np.array([r["text_tokens"] + r["visual_kept"] for r in rows], dtype=np.float64)
    n_out = np.array([r["output_tokens"] for r in rows], dtype=np.float64)
    m = np.array([r["measured_j"] for r in rows], dtype=np.float64)
    errors = []
    for i in range(len(rows)):
        keep = np.arange(len(rows)) != i
        c = fit_per_model(n_in[keep], n_out[keep], m[keep], 1.0, relative=True).coefficients
        pred = c["b_j"] + c["in_j"] * n_in[i] + c["out_j"] * n_out[i]
        errors.append(abs(pred / m[i] - 1.0))
    return 100.0 * statistics.fmean(errors)


def held_out_mape(
    rt: Any,
    predictor: Any,
    n: int,
    seed: int,
    *,
    prompts: tuple[str, ...],
    make_image: Callable[[int, int], Image.Image],
    online: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """MAPE of a frozen predictor on requests off the calibration grid (forced lengths).

    `mape_pct` is the predictor's error on what it predicts: the run (LM prefill and decode), scored
    against the first of two back-to-back runs. `request_mape_pct` is the error of the planner's
    whole-request figure, in which the image preprocessing and vision encoder are measured before
    planning, not predicted. See the module docstring for the floors and `online`.
    """
    from joulecap.runtime.calibrate import forced_length, run_measured
    from joulecap.runtime.types import ChatMessage, ImagePart, Plan, Request, TextPart

    rng = np.random.default_rng(seed)
    online = online or {}
    errors, request_errors, encode_share, repeat = [], [], [], []
    online_errors: dict[str, list[float]] = {name: [] for name in online}
    reference_j: list[float] = []
    rows: list[dict[str, Any]] = []
    reference = _reference(rt, make_image, prompts[0])
    with forced_length(rt.engine):
        for i in tqdm(range(n), desc="held-out", leave=False):
            reference_j.append(run_measured(rt.engine, rt.monitor, *reference)[2])
            px = int(rng.choice([80, 128, 200, 320]))
            prompt = " ".join(str(rng.choice(prompts)) for _ in range(int(rng.integers(1, 4))))
            req = Request(
                request_id=f"heldout-{i}",
                messages=(ChatMessage("user", (ImagePart(0), TextPart(prompt))),),
                images=(make_image(px, seed + i),),
            )
            prepared, encode = rt.monitor.measure(lambda req=req: rt.engine.prepare(req))
            frac = float(rng.uniform(0, 1))
            keep = tuple(round(frac * v) for v in prepared.visual_tokens)
            out = int(rng.integers(2, 44))
            plan = Plan(keep, out, 0.0, "heldout", "held-out measurement")
            kept, n_out, energy_j, _, _, _ = run_measured(rt.engine, rt.monitor, prepared, plan)
            again_j = run_measured(rt.engine, rt.monitor, prepared, plan)[2]
            pred = predictor.predict(prepared.text_tokens, kept, n_out).total_j
            online_pred: dict[str, float] = {}
            for name, p in online.items():  # predicted before, learnt after: as a server does
                online_pred[name] = p.predict(prepared.text_tokens, kept, n_out).total_j
                online_errors[name].append(abs(online_pred[name] - energy_j) / energy_j)
                p.update(prepared.text_tokens, kept, n_out, energy_j)
            errors.append(abs(pred - energy_j) / energy_j)
            request_errors.append(abs(pred - energy_j) / (energy_j + encode.total_j))
            encode_share.append(encode.total_j / (energy_j + encode.total_j))
            repeat.append(abs(energy_j - again_j) / (energy_j + again_j))
            rows.append(
                {
                    "text_tokens": prepared.text_tokens,
                    "visual_kept": kept,
                    "output_tokens": n_out,
                    "predicted_j": pred,
                    "online_predicted_j": online_pred,
                    "measured_j": energy_j,
                    "repeat_j": again_j,
                    "encode_j": encode.total_j,
                }
            )
    return {
        "requests": n,
        "mape_pct": 100.0 * statistics.fmean(errors),
        "request_mape_pct": 100.0 * statistics.fmean(request_errors),
        "encode_share_pct": 100.0 * statistics.fmean(encode_share),
        "median_ape_pct": 100.0 * statistics.median(errors),
        "p90_ape_pct": pct([100 * e for e in errors], 90),
        "repeat_ape_pct": 100.0 * statistics.fmean(repeat),
        "refit_loo_mape_pct": refit_loo_mape_pct(rows),
        "reference_ape_pct": _mean_ape_from_mean(reference_j),
        "online": {
            name: {
                "mape_pct": 100.0 * statistics.fmean(errs),
                "median_ape_pct": 100.0 * statistics.median(errs),
                "speed_alpha": online[name].speed_alpha,
                "speed_factor_at_end": online[name].speed_factor,
            }
            for name, errs in online_errors.items()
        },
        "reference_j": reference_j,
        "rows": rows,
    }


def _mean_ape_from_mean(values: list[float]) -> float:
    """Mean of `|v - mean(v)| / v`, in percent."""
    mean = statistics.fmean(values)
    return 100.0 * statistics.fmean(abs(v - mean) / v for v in values)


def _reference(rt: Any, make_image: Callable[[int, int], Image.Image], prompt: str) -> tuple[Any, Any]:
    """The fixed request (prepared once) and plan that `held_out_mape` repeats as a drift probe."""
    from joulecap.runtime.types import ChatMessage, ImagePart, Plan, Request, TextPart

    req = Request(
        request_id="heldout-reference",
        messages=(ChatMessage("user", (ImagePart(0), TextPart(prompt))),),
        images=(make_image(128, 0),),
    )
    prepared = rt.engine.prepare(req)
    keep = tuple(round(0.5 * v) for v in prepared.visual_tokens)
    return prepared, Plan(keep, 24, 0.0, "heldout", "drift reference")
