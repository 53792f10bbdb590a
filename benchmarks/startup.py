"""A fresh server, as a new user gets it: start-up calibration, the first request, convergence.

On an empty cache directory the runtime calibrates itself (the quick sweep) and warms up, then
serves TinyVQA questions one after another. The benchmark reports:

- the start-up time split into calibration and warm-up;
- the first request's energy against the median of the next ten (target: at most 1.5x);
- each request's prediction error (the LM run's predicted joules for the tokens it really had,
  before the runtime learns from it, against the measured ones), and from which request on every
  prediction is within 25%;
- the same without calibration (`--no-auto-calibrate` on its own fresh cache), side by side.

Every energy figure says where it came from (on a machine without an energy counter: estimated).

    python benchmarks/startup.py [--requests 15] [--out benchmarks/results/startup_cpu.json]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script, benchmarks/ is sys.path[0] and its kernels.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # shadows HF `kernels`: use the root

from benchmarks import _common as common

FIRST_OVER_MEDIAN_MAX = 1.5
"""Target: the first request costs at most this multiple of the median of the next ten."""
APE_TARGET = 0.25
"""Target: predictions within 25% of the measurement."""
APE_FROM_REQUEST = 5
"""... from this request on (1-based)."""


def serve_fresh(requests: int, seed: int, *, auto_calibrate: bool, meter: str) -> dict[str, Any]:
    """Start a runtime on an empty cache and serve `requests` TinyVQA questions."""
    from joulecap.runtime.config import JoulecapConfig
    from joulecap.runtime.runtime import Runtime

    items = common.load_tinyvqa(requests, seed)
    with tempfile.TemporaryDirectory(prefix="joulecap-startup-") as tmp:
        base = JoulecapConfig()
        cfg = replace(
            base,
            energy=replace(base.energy, meter=meter),
            paths=replace(base.paths, cache_dir=str(Path(tmp) / "cache"), ledger_path=":memory:"),
            calibration=replace(base.calibration, auto_calibrate=auto_calibrate),
        )
        t0 = time.monotonic()
        with Runtime(cfg) as rt:
            startup_s = time.monotonic() - t0
            rows = []
            for i, item in enumerate(items):
                # The prediction as it stands before this request teaches the predictor, for the
                # tokens the answer really had: the LM run's error (the encode is measured).
                (b_j, in_j, out_j), speed = rt.predictor.coefficients, rt.predictor.speed_factor
                result = rt.chat(item.prompt, [item.image], max_tokens=8)
                gen = result.generation
                predicted = speed * (b_j + in_j * gen.prefill_tokens + out_j * len(gen.token_ids))
                measured = result.energy.run_j
                rows.append(
                    {
                        "request": i + 1,
                        "total_j": result.energy.total_j,
                        "encode_j": result.energy.encode_j,
                        "run_measured_j": measured,
                        "run_predicted_j": predicted,
                        "ape": abs(predicted - measured) / measured if measured > 0 else None,
                        "duration_s": result.energy.duration_s,
                        "output_tokens": result.completion_tokens,
                        "source": result.energy.source,
                        "meter": result.energy.meter,
                    }
                )
            return {
                "auto_calibrate": auto_calibrate,
                "profile": {"how": rt.profile.how, "detail": rt.profile.detail},
                "startup_s": startup_s,
                "rows": rows,
            }


def judge(run: dict[str, Any]) -> dict[str, Any]:
    """First request over the median of the next ten; the first request from which all are within 25%."""
    rows = run["rows"]
    energy = [r["total_j"] for r in rows]
    nxt = energy[1:11]
    ratio = energy[0] / statistics.median(nxt) if nxt else None
    apes = [r["ape"] for r in rows]
    within_from = next(
        (i + 1 for i in range(len(apes)) if all(a is not None and a <= APE_TARGET for a in apes[i:])), None
    )
    return {
        "first_over_median_next10": ratio,
        "first_met": ratio is not None and ratio <= FIRST_OVER_MEDIAN_MAX,
        "median_ape_from_5th": statistics.median(a for a in apes[APE_FROM_REQUEST - 1 :] if a is not None)
        if len(apes) >= APE_FROM_REQUEST
        else None,
        "all_within_25pct_from_request": within_from,
        "convergence_met": within_from is not None and within_from <= APE_FROM_REQUEST,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--meter", default="auto")
    parser.add_argument("--out", default="benchmarks/results/startup_cpu.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    runs = {}
    for auto in (True, False):
        run = serve_fresh(args.requests, args.seed, auto_calibrate=auto, meter=args.meter)
        run["judged"] = judge(run)
        runs["auto_calibrate" if auto else "no_auto_calibrate"] = run
    print(f"{'server':18s} {'start s':>8s} {'first/med10':>11s} {'APE>=5th med':>12s} {'all<=25% from':>13s}")
    for name, run in runs.items():
        j = run["judged"]
        ape = j["median_ape_from_5th"]
        ape_pct = 100 * ape if ape is not None else float("nan")
        within = str(j["all_within_25pct_from_request"])
        print(
            f"{name:18s} {run['startup_s']:8.1f} {j['first_over_median_next10']:11.2f} "
            f"{ape_pct:11.1f}% {within:>13s}"
        )
    out = {
        "benchmark": "startup",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": "python benchmarks/startup.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": common.machine_info(),
        "targets": {
            "first_over_median_next10_max": FIRST_OVER_MEDIAN_MAX,
            "ape_max": APE_TARGET,
            "from_request": APE_FROM_REQUEST,
        },
        "runs": runs,
    }
    common.write_json(Path(args.out), out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
