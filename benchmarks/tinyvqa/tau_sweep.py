"""Choose E-AdaPrune's tau on answers: TinyVQA validation accuracy and tokens kept vs tau (and centring).

Every condition runs on the same validation questions (`make_example("val", i)`: never the test
split, never the benchmark's held-out seeds), with the scheduler's `k_min` floor and leverage
selection, exactly as `benchmarks.tinyvqa.eval` prunes (the LM input really gets shorter).

    python -m benchmarks.tinyvqa.tau_sweep --n 300

writes `benchmarks/results/tinyvqa_tau_sweep.json` and prints the curve. The rule that turns the
curve into the default tau is in `choose_tau` (and docs/policies.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.tinyvqa.eval import DEFAULT_MODEL, Condition, evaluate

OUT = Path(__file__).resolve().parents[1] / "results" / "tinyvqa_tau_sweep.json"
TAUS = (0.9, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0)
FINE_TAUS = (0.99999, 0.999999, 0.9999999, 0.99999999, 1.0)
"""`--fine`: between 0.9999 and 1, where TinyVQA's budget leaves k_min (uncentred only)."""
QUALITY_TOLERANCE = 0.01
"""A tau is acceptable when its short-answer accuracy is within this of keeping every token."""


def conditions(
    taus: tuple[float, ...] = TAUS, centres: tuple[bool, ...] = (False, True)
) -> tuple[Condition, ...]:
    """Full image, then the spectral budget at every tau, uncentred and centred."""
    out = [Condition("full", "all", 1.0)]
    for center in centres:
        for tau in taus:
            out.append(
                Condition(f"tau={tau:.10g}{' centred' if center else ''}", "adaptive", tau=tau, center=center)
            )
    return tuple(out)


def choose_tau(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The smallest tau (fewest tokens) whose accuracy is within `QUALITY_TOLERANCE` of the full image.

    Accuracy is short-answer exact match and describe recall, both; among acceptable taus (centred
    or not) the one keeping the fewest tokens wins. None acceptable: the tau with the best short
    accuracy.
    """
    full = next(r for r in results if r["condition"] == "full")
    swept = [r for r in results if r["tau"] is not None]
    ok = [
        r
        for r in swept
        if r["exact_short"] >= full["exact_short"] - QUALITY_TOLERANCE
        and r["describe_recall"] >= full["describe_recall"] - QUALITY_TOLERANCE
    ]
    best = (
        min(ok, key=lambda r: (r["mean_kept_frac"], r["tau"]))
        if ok
        else max(swept, key=lambda r: r["exact_short"])
    )
    return {
        "tau": best["tau"],
        "center": best["center"],
        "within_tolerance": bool(ok),
        "tolerance": QUALITY_TOLERANCE,
        "kept_frac": best["mean_kept_frac"],
        "exact_short": best["exact_short"],
        "describe_recall": best["describe_recall"],
        "full_exact_short": full["exact_short"],
        "full_describe_recall": full["describe_recall"],
    }


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    from benchmarks._common import RunRecord

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="default: results/tinyvqa_tau_sweep[_fine].json")
    ap.add_argument("--fine", action="store_true", help="the taus between 0.9999 and 1, uncentred")
    args = ap.parse_args(argv)
    record = RunRecord.start("-m benchmarks.tinyvqa.tau_sweep", argv)
    torch.set_num_threads(args.threads)
    conds = conditions(FINE_TAUS, (False,)) if args.fine else conditions()
    out = args.out or (OUT.with_name("tinyvqa_tau_sweep_fine.json") if args.fine else OUT)
    doc = evaluate(args.model, args.n, 0, conditions=conds, split="val")
    for r in doc["results"]:
        r.pop("by_max_new_tokens", None)
    doc["choice"] = choose_tau(doc["results"])
    doc = record.stamp({"benchmark": "tinyvqa_tau_sweep", **doc})
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'condition':<22}{'kept':>7}{'short':>8}{'recall':>8}")
    for r in doc["results"]:
        print(
            f"{r['condition']:<22}{r['mean_kept_frac']:>7.3f}{r['exact_short']:>8.3f}{r['describe_recall']:>8.3f}"
        )
    print("choice:", doc["choice"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
