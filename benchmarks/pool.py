"""Pool several runs of the scheduler benchmark: per-run figures, pooled figures, intervals.

One run of `benchmarks/scheduler.py` holds about 60 budgeted `joint` requests, so one request
over budget moves its adherence by 1.6 points, and on a noisy machine its held-out MAPE swings
with the hour (benchmarks/stability.py). This tool reads the JSON of several runs (made with the
same code; each file's `session_note`, when present, says which) and prints each run's figures
beside the pooled ones:

* adherence: requests at or under budget over requests run, pooled over every run, with a 95%
  Wilson interval (recomputed from the per-request rows, not from rounded percentages);
* use where the budget binds: the mean over every binding request of every run (each run's mean
  weighted by its number of binding requests, which is that same mean);
* held-out MAPE of the frozen, RLS-only and server predictors, and the machine's floors measured
  in the same runs (repeat run-to-run, refitted form, fixed reference request): mean over runs
  (each run scores the same number of held-out requests);
* how closely the judged MAPE follows the floors from run to run (Pearson r): a predictor whose
  error the machine sets rises and falls with them;
* for each target, how many runs met it on their own, and whether the pooled figure meets it.

Prints a table and writes JSON. Nothing is run; it only reads results.

    python -m benchmarks.pool benchmarks/results/scheduler_cpu_run1[4-9].json \
        [--out benchmarks/results/scheduler_cpu_pooled.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script, benchmarks/ is sys.path[0] and its kernels.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # shadows HF `kernels`: use the root

from benchmarks._common import write_json
from benchmarks.scheduler import judge_targets, planning_p50_ms, within_budget

_MAPES = {
    "frozen": lambda h: h["mape_pct"],
    "rls_only": lambda h: h["online"]["rls_only"]["mape_pct"],
    "server": lambda h: h["online"]["server"]["mape_pct"],
    "floor_repeat": lambda h: h["repeat_ape_pct"],
    "floor_refit": lambda h: h["refit_loo_mape_pct"],
    "floor_reference": lambda h: h["reference_ape_pct"],
}
"""Held-out figures read from each run (all in percent)."""


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, in percent ((nan, nan) for n = 0)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (100.0 * (centre - half), 100.0 * (centre + half))


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else math.nan


def run_figures(data: dict[str, Any], policy: str = "joint") -> dict[str, Any]:
    """One run's figures for `policy`, read from a scheduler benchmark JSON."""
    rows = [r for r in data["requests"][policy] if not r["refused"]]
    summary = data["policies"][policy]
    held = data["heldout"]
    mapes: dict[str, float | None] = {}
    for name, read in _MAPES.items():
        try:
            mapes[name] = float(read(held))
        except (KeyError, TypeError):  # older runs lack the online and reference figures
            mapes[name] = None
    return {
        "ran": len(rows),
        "within": sum(within_budget(r) for r in rows),
        "max_overshoot_pct": summary["max_overshoot_pct"],
        "binding": summary["binding"],
        # Written as null when nothing bound (NaN is not JSON).
        "mean_use_binding_pct": _number(summary["mean_use_binding_pct"]),
        "planning_besides_spectral_p50_ms": planning_p50_ms(data["planning"]),
        "heldout_mape_pct": mapes,
        "session_note": data.get("session_note"),
        "machine": data["machine"]["label"],
    }


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _correlation(figs: list[dict[str, Any]], a: str, b: str) -> float | None:
    """Pearson r of two held-out figures over the runs that have both (None below 3 runs)."""
    pairs = [(f["heldout_mape_pct"][a], f["heldout_mape_pct"][b]) for f in figs]
    present = [(x, y) for x, y in pairs if x is not None and y is not None]
    if len(present) < 3:
        return None
    xs, ys = zip(*present, strict=True)
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:  # one of them constant over the runs
        return None


def pool(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pooled figures and target counts over `runs` (name -> `run_figures`)."""
    if not runs:
        raise ValueError("no runs to pool")
    figs = list(runs.values())
    ran = sum(f["ran"] for f in figs)
    within = sum(f["within"] for f in figs)
    binding = sum(f["binding"] for f in figs)
    # A run where nothing bound has no mean (NaN) and no weight.
    weighted = sum(f["mean_use_binding_pct"] * f["binding"] for f in figs if f["binding"])
    use = weighted / binding if binding else math.nan
    mapes = {name: _mean([f["heldout_mape_pct"][name] for f in figs]) for name in _MAPES}
    # The scheduler benchmark judges MAPE on the server's predictor when it has one.
    judged = "server" if mapes["server"] is not None else "frozen"
    planning = max(f["planning_besides_spectral_p50_ms"] for f in figs)
    within_pct = _pct(within, ran)
    per_run = [
        judge_targets(
            _pct(f["within"], f["ran"]),
            f["mean_use_binding_pct"],
            math.inf if f["heldout_mape_pct"][judged] is None else f["heldout_mape_pct"][judged],
            f["planning_besides_spectral_p50_ms"],
        )
        for f in figs
    ]
    judged_mape = mapes[judged]
    pooled_targets = judge_targets(
        within_pct, use, math.inf if judged_mape is None else judged_mape, planning
    )
    floors = ("floor_repeat", "floor_refit", "floor_reference")
    return {
        "runs": len(figs),
        "ran": ran,
        "within": within,
        "within_budget_pct": within_pct,
        "within_budget_wilson95_pct": wilson(within, ran),
        "binding": binding,
        "mean_use_binding_pct": use,
        "heldout_mape_pct": mapes,
        "mape_judged_on": judged,
        # If the machine sets the error, the predictor's MAPE rises and falls with the floors
        # measured beside it, run by run.
        "mape_floor_correlation": {floor: _correlation(figs, judged, floor) for floor in floors},
        "planning_besides_spectral_p50_ms_max": planning,
        "runs_meeting_target": {name: sum(t[name] for t in per_run) for name in pooled_targets},
        "pooled_targets": pooled_targets,
    }


def _fmt(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"


def print_table(runs: dict[str, dict[str, Any]], pooled: dict[str, Any]) -> None:
    """Print one line per run and the pooled line."""
    print(f"{'run':<28}{'ran':>5}{'<=budget %':>11}{'use %':>7}", end="")
    print(f"{'MAPE frozen':>12}{'server':>8}{'floor ref':>10}")
    for name, f in runs.items():
        m = f["heldout_mape_pct"]
        print(
            f"{name:<28}{f['ran']:>5}{_pct(f['within'], f['ran']):>11.1f}{f['mean_use_binding_pct']:>7.1f}"
            f"{_fmt(m['frozen'], 12)}{_fmt(m['server'], 8)}{_fmt(m['floor_reference'], 10)}"
        )
    m = pooled["heldout_mape_pct"]
    lo, hi = pooled["within_budget_wilson95_pct"]
    print(
        f"{'pooled':<28}{pooled['ran']:>5}{pooled['within_budget_pct']:>11.1f}{pooled['mean_use_binding_pct']:>7.1f}"
        f"{_fmt(m['frozen'], 12)}{_fmt(m['server'], 8)}{_fmt(m['floor_reference'], 10)}"
    )
    corr = ", ".join(
        f"{floor.removeprefix('floor_')} {r:+.2f}"
        for floor, r in pooled["mape_floor_correlation"].items()
        if r is not None
    )
    if corr:
        print(f"\n{pooled['mape_judged_on']} MAPE against the floors, run by run (Pearson r): {corr}")
    print(f"\nwithin budget, pooled: {pooled['within']} of {pooled['ran']} (95% interval {lo:.1f}-{hi:.1f}%)")
    for target, ok in pooled["pooled_targets"].items():
        met = pooled["runs_meeting_target"][target]
        verdict = "MET" if ok else "NOT MET"
        print(f"target {target}: pooled {verdict}; met by {met} of {pooled['runs']} runs alone")


def main(argv: list[str] | None = None) -> int:
    """Pool the given scheduler benchmark JSON files; print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="Scheduler benchmark JSON files of the same code.")
    parser.add_argument("--policy", default="joint", help="Policy whose adherence and use are pooled.")
    parser.add_argument("--out", default=None, help="Write the pooled JSON here.")
    args = parser.parse_args(argv)
    if len(set(args.files)) < len(args.files):
        raise SystemExit("a file is named twice: each run may be pooled once")
    # Short names in the table, unless two runs in different folders share one.
    names = [Path(path).name for path in args.files]
    if len(set(names)) < len(names):
        names = list(args.files)
    runs = {}
    for name, path in zip(names, args.files, strict=True):
        try:
            runs[name] = run_figures(json.loads(Path(path).read_text()), args.policy)
        except (OSError, ValueError, KeyError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise SystemExit(f"{path}: not a scheduler benchmark result ({reason})") from exc
    pooled = pool(runs)
    print_table(runs, pooled)
    if args.out:
        out = {"benchmark": "scheduler_pooled", "policy": args.policy, "runs": runs, "pooled": pooled}
        write_json(Path(args.out), out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
